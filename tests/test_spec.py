"""Pipeline text and TOML recipes: parsing into typed pass objects, errors for typos, round trips."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import pytest

from onnxsparse.errors import PipelineSpecError
from onnxsparse.passes import Pass, register
from onnxsparse.passes.cleanup import Cleanup
from onnxsparse.passes.fold_batchnorm import FoldBatchNorm
from onnxsparse.spec import format_pipeline, load_recipe, parse_pipeline, parse_tolerance_text
from onnxsparse.validation import Tolerance


@register
@dataclass(frozen=True)
class OptionsProbe(Pass):
    """A pass with every kind of option, to prove the parser (does nothing)."""

    name = "test-options"

    sparsity: float = 0.5
    steps: int = 1
    enabled: bool = True
    mode: Literal["fast", "exact"] = "fast"
    include: tuple[str, ...] = ()
    label: str = "x"
    limit: float | None = None
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1)")


def test_text_pipeline_builds_typed_pass_objects():
    passes = parse_pipeline(
        'cleanup, test-options{sparsity=0.25 steps=3 enabled=false mode=exact include=Conv,Gemm label="a b" limit=0.1 overrides=conv1:0.3,fc:0.7}'
    )
    assert passes[0] == Cleanup()
    probe = passes[1]
    assert (probe.sparsity, probe.steps, probe.enabled, probe.mode) == (0.25, 3, False, "exact")
    assert probe.include == ("Conv", "Gemm") and probe.label == "a b" and probe.limit == 0.1
    assert dict(probe.overrides) == {"conv1": 0.3, "fc": 0.7}


@pytest.mark.parametrize(
    "text",
    [
        "cleanup",
        "cleanup,fold-batchnorm",
        "test-options{sparsity=0.25 include=Conv,Gemm}",
        'test-options{label="a b" mode=exact enabled=false limit=none}',
        "test-options{limit=1e-07 overrides=conv1:0.3,fc:0.7},cleanup{drop_unused_inputs=true}",
    ],
)
def test_text_form_round_trips(text):
    passes = parse_pipeline(text)
    formatted = format_pipeline(passes)
    assert parse_pipeline(formatted) == passes
    assert format_pipeline(parse_pipeline(formatted)) == formatted


@pytest.mark.parametrize(
    "probe",
    [
        OptionsProbe(overrides={"conv1/weight:0": 0.3}),
        OptionsProbe(include=("Conv", "my layer")),
        OptionsProbe(include=("a,b",)),
        OptionsProbe(include=("",)),
        OptionsProbe(include=("a", "")),
        OptionsProbe(include=()),
        OptionsProbe(label='say "hi" {x=1}'),
        OptionsProbe(label="back\\slash"),
        OptionsProbe(label="none"),
        OptionsProbe(label=""),
    ],
)
def test_awkward_values_round_trip_through_text(probe):
    assert parse_pipeline(format_pipeline([probe])) == [probe]


def test_format_writes_only_non_default_options():
    assert format_pipeline([Cleanup(), FoldBatchNorm()]) == "cleanup,fold-batchnorm"
    assert format_pipeline(parse_pipeline("test-options{sparsity=0.5 steps=2}")) == "test-options{steps=2}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clenaup", "unknown pass 'clenaup' (did you mean 'cleanup'?); known passes: "),
        ("test-options{sparsty=0.5}", "unknown option(s) sparsty (did you mean 'sparsity'?); valid options: sparsity"),
        ("test-options{sparsity=half}", "'half' is not a float"),
        ("test-options{steps=1.5}", "'1.5' is not a int"),
        ("test-options{enabled=maybe}", "'maybe' is not true or false"),
        ("test-options{mode=slow}", "'slow' is not one of fast, exact"),
        ("test-options{sparsity=1.5}", "sparsity 1.5 is outside [0, 1)"),
        ("test-options{sparsity=0.1 sparsity=0.2}", "given twice"),
        ("test-options{sparsity=0.1", "unbalanced"),
        ("test-options{sparsity}", "expected key=value"),
        ("", "empty pipeline"),
    ],
)
def test_bad_pipeline_text_is_one_clear_error(text, message):
    with pytest.raises(PipelineSpecError) as error:
        parse_pipeline(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_recipe_gives_passes_tolerances_and_policy(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        """
policy = "keep"
[tolerance]
min_cosine = 0.999
[tolerance.outputs.logits]
max_rel = 1e-3
[tolerance.passes.fold-batchnorm]
max_abs = 0.01
[[pass]]
name = "cleanup"
[[pass]]
name = "test-options"
sparsity = 0.3
include = ["Conv", "MatMul"]
overrides = { conv1 = 0.2 }
""",
        encoding="utf-8",
    )
    loaded = load_recipe(recipe)
    assert loaded.policy == "keep"
    assert loaded.passes[0] == Cleanup()
    assert loaded.passes[1].sparsity == 0.3 and loaded.passes[1].include == ("Conv", "MatMul")
    assert dict(loaded.passes[1].overrides) == {"conv1": 0.2}
    assert loaded.tolerances.default == Tolerance(min_cosine=0.999)
    assert loaded.tolerances.per_output["logits"] == Tolerance(max_rel=1e-3)
    assert loaded.tolerances.per_pass["fold-batchnorm"] == Tolerance(max_abs=0.01)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[pass]]\nname = "cleanup"\ndrop_unused_inptus = true\n', "unknown option(s) drop_unused_inptus"),
        ('polcy = "keep"\n[[pass]]\nname = "cleanup"\n', "unknown key(s) polcy"),
        ('policy = "sometimes"\n[[pass]]\nname = "cleanup"\n', "policy 'sometimes'"),
        ('[tolerance]\nmax_rell = 1\n[[pass]]\nname = "cleanup"\n', "unknown bound(s) max_rell"),
        ('[tolerance.passes.nope]\nmax_rel = 1\n[[pass]]\nname = "cleanup"\n', "unknown pass 'nope'"),
        ("[[pass]]\nsparsity = 0.5\n", "has no name"),
        ("policy = 'keep'\n", "no [[pass]] entries"),
        ("[[pass]\n", "not a valid TOML recipe"),
    ],
)
def test_bad_recipe_is_one_clear_error_naming_the_file(tmp_path, body, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(body, encoding="utf-8")
    with pytest.raises(PipelineSpecError) as error:
        load_recipe(recipe)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_tolerance_text_form():
    assert parse_tolerance_text("max_rel=1e-3 min_top1=0.9") == Tolerance(max_rel=1e-3, min_top1=0.9)
    with pytest.raises(PipelineSpecError, match="unknown bound"):
        parse_tolerance_text("max_relative=1")
