"""The pass registry: built-in passes, the frozen-dataclass contract, third-party entry points."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from onnxsparse import list_passes, passes
from onnxsparse.errors import PipelineSpecError
from onnxsparse.passes import Pass, base, pass_class, register
from onnxsparse.spec import parse_pipeline


def test_built_in_passes_are_registered_with_a_summary():
    passes = list_passes()
    assert {"cleanup", "fold-batchnorm"} <= set(passes)
    assert all(cls.summary() for cls in passes.values())


def test_the_built_in_table_names_every_pass_module_and_each_registers_its_name():
    """BUILT_IN is how a pass's module is found without importing the others: every module of the
    package that defines a pass is in it, under the name its class registers."""
    import importlib
    import inspect

    folder = Path(base.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__", "base", "options"}
    modules |= {path.parent.name for path in folder.glob("*/__init__.py")}  # a pass that is a package (qdq)
    assert set(passes.BUILT_IN.values()) == modules
    for name, module in passes.BUILT_IN.items():
        home = f"onnxsparse.passes.{module}"
        classes = [c for c in vars(importlib.import_module(home)).values()
                   if inspect.isclass(c) and issubclass(c, Pass) and (c.__module__ == home or c.__module__.startswith(f"{home}."))]
        assert [c.name for c in classes] == [name]
        assert pass_class(name) is classes[0]


def test_a_pipeline_imports_only_the_passes_it_names():
    """A fresh interpreter parsing "cleanup" imports no other pass module (each costs start-up time)."""
    import subprocess

    code = ("import sys; from onnxsparse.spec import parse_pipeline; parse_pipeline('cleanup'); "
            "print(sorted(m for m in sys.modules if m.startswith('onnxsparse.passes.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == str(["onnxsparse.passes.base", "onnxsparse.passes.cleanup", "onnxsparse.passes.options"])


def test_a_plugin_taking_a_built_in_name_is_refused_at_once_and_breaks_nothing_after():
    """Built-in passes load lazily; registering one's name before it loaded must still fail at the
    decorator, not at a later lookup of any pass."""
    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "cluster"

    with pytest.raises(TypeError, match="taken"):
        register(Impostor)
    assert pass_class("cluster").__name__ != "Impostor" and parse_pipeline("cleanup")


def test_a_pass_must_be_a_frozen_dataclass_with_a_free_name():
    class NotADataclass(Pass):
        name = "test-not-a-dataclass"

    with pytest.raises(TypeError, match="frozen dataclass"):
        register(NotADataclass)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "cleanup"

    with pytest.raises(TypeError, match="'cleanup' is taken"):
        register(Impostor)


def test_passes_are_immutable():
    cleanup = parse_pipeline("cleanup")[0]
    with pytest.raises(AttributeError):
        cleanup.drop_unused_inputs = True  # type: ignore[misc]


def test_third_party_passes_load_through_the_entry_point_group(tmp_path: Path, monkeypatch):
    package = tmp_path / "thirdparty_passes.py"
    package.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from onnxsparse.passes import Pass, PassResult

        @dataclass(frozen=True)
        class Plugged(Pass):
            """A pass from another package."""
            name = "test-plugged"
            strength: int = 1

            def run(self, model, context):
                return PassResult(model)
    '''), encoding="utf-8")
    dist_info = tmp_path / "thirdparty_passes-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-passes\nVersion: 1.0\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text("[onnxsparse.passes]\nplugged = thirdparty_passes:Plugged\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_entry_points_loaded", False)

    try:
        plugged = parse_pipeline("cleanup,test-plugged{strength=3}")[1]
        assert type(plugged).__module__ == "thirdparty_passes" and plugged.strength == 3
        assert pass_class("test-plugged") is type(plugged)
    finally:
        base._REGISTRY.pop("test-plugged", None)
        sys.modules.pop("thirdparty_passes", None)


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(PipelineSpecError, match=r"unknown pass 'nope'; known passes: .*cleanup.*fold-batchnorm"):
        pass_class("nope")


def test_options_are_checked_when_a_pass_is_built_from_python_too():
    from onnxsparse.passes.channel_prune import ChannelPrune
    from onnxsparse.passes.magnitude import MagnitudePrune
    from onnxsparse.passes.qdq import Qdq

    with pytest.raises(PipelineSpecError, match=r"channel-prune\{criterion\}: 'L1' is not one of l1, l2"):
        ChannelPrune(criterion="L1")  # type: ignore[arg-type]  # silently became L2 before
    with pytest.raises(PipelineSpecError, match=r"qdq\{mode\}: 'Static' is not one of auto, static, dynamic"):
        Qdq(mode="Static")  # type: ignore[arg-type]  # its spec() printed text the parser rejects
    with pytest.raises(PipelineSpecError, match=r"channel-prune: .*ratoi.*; valid options: ratio, scope"):
        ChannelPrune(ratoi=0.3)  # type: ignore[call-arg]
    with pytest.raises(PipelineSpecError, match=r"channel-prune: ratio 1.5 is outside"):
        ChannelPrune(ratio=1.5)
    with pytest.raises(PipelineSpecError, match=r"magnitude-prune\{sparsity\}: 'half' is not a float"):
        MagnitudePrune(sparsity="half")  # type: ignore[arg-type]
    built = Qdq(exclude=["Gemm"], percentile=99)  # type: ignore[arg-type]  # a list and an int are taken as a tuple and a float
    assert built.exclude == ("Gemm",) and isinstance(built.percentile, float)
    assert parse_pipeline(built.spec())[0] == built
