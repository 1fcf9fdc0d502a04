"""The package is layered: a module imports only modules below it in LAYERS, at the top of the file
or inside a function alike. A new module gets its place in the list; an import that goes up fails
here, with the line that does it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxsparse"

# Lowest first. A module may import any module listed before it, never one after it.
LAYERS = (
    # words, errors, limits and files: no knowledge of models
    "version", "errors", "text", "limits", "files",
    # graphs and model files: walking a model, its tensors outside the message, graphsurgeon, load and save
    "walk", "weightstore", "bitmask", "graph", "results", "io", "runtime",
    # data, running models, comparing outputs
    "calibration", "validation", "quantization", "activations", "shapes", "latency",
    # analyses and numerics over weights and channels
    "layers", "weights", "channels", "layerwise", "blockwise", "codebook", "refit", "inspect_model",
    # the training engine (torch, an optional extra: imported by nothing above unless asked for; augment is numpy only)
    "train", "train.augment", "train.ops", "train.graph_module",
    # the pass contract, then the passes
    "passes.options", "passes.base", "passes.cleanup", "passes.simplify", "passes.fold_batchnorm", "passes.sparse_encode", "passes.magnitude",
    "passes.channel_prune.groups", "passes.channel_prune.budget", "passes.channel_prune.importance", "passes.channel_prune.exact",
    "passes.channel_prune.edit", "passes.channel_prune.prune", "passes.channel_prune",
    "passes.qdq.rules", "passes.qdq.plan", "passes.qdq.materialize", "passes.qdq.bias_correction", "passes.qdq.guard", "passes.qdq.quantize", "passes.qdq",
    "passes.weight_only", "passes.cluster", "passes.mixed_precision", "passes.fp16", "passes.distill", "passes",
    # what drives the passes
    "report", "htmlpage", "spec", "pipeline",
    # the search over pipelines
    "tuner.candidates", "tuner.records", "tuner.cache", "tuner.executors", "tuner.html", "tuner.peers", "tuner.search", "tuner",
    "cli", "", "__main__",
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``: imports for annotations, not run."""
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", getattr(n.test, "attr", "")) == "TYPE_CHECKING"]
    return {id(inner) for block in guarded for statement in block.body for inner in ast.walk(statement)}


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, onnxsparse module) for every import of the package's own modules in ``tree`` that runs."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "onnxsparse":
                target = node.module.removeprefix("onnxsparse").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import validate` imports a module, not a name
                child = f"{target}.{alias.name}" if target else alias.name
                found.append((node.lineno, child if child in LAYERS else target))
        elif isinstance(node, ast.Call) and _dynamic_import(node) is not None:
            name = _dynamic_import(node) or ""
            found.append((node.lineno, name.removeprefix("onnxsparse").lstrip(".") if name.startswith("onnxsparse") else name.lstrip(".")))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name.removeprefix("onnxsparse").lstrip(".")) for a in node.names if a.name.split(".")[0] == "onnxsparse")
    return found


def _dynamic_import(call: ast.Call) -> str | None:
    """The module an ``importlib.import_module("...")`` or ``__import__("...")`` call names, if literal
    and ours ("onnxsparse.x", or ".x" relative to the package)."""
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (isinstance(func, ast.Name) and func.id in ("__import__", "import_module"))
    if not named or not call.args or not isinstance(call.args[0], ast.Constant) or not isinstance(call.args[0].value, str):
        return None
    name = call.args[0].value
    return name if name.startswith(("onnxsparse", ".")) else None


def test_every_module_has_a_layer():
    modules = {_module_name(path) for path in PACKAGE.rglob("*.py")}
    assert modules == set(LAYERS), f"not in LAYERS: {sorted(modules - set(LAYERS))}; gone: {sorted(set(LAYERS) - modules)}"


def test_no_module_imports_one_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        rank = LAYERS.index(module)
        for line, target in _imported(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py"):
            if target in LAYERS and LAYERS.index(target) >= rank and target != module:
                upward.append(f"onnxsparse/{path.relative_to(PACKAGE)}:{line}: {module or 'onnxsparse'} imports {target or 'onnxsparse'}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)
