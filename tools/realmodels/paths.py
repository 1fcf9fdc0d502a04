"""Where the real models live. Standard library only: ``tools/fetch_models.py`` imports this
with whatever ``python3`` runs it, before any third-party package is installed."""

from __future__ import annotations

import os
from pathlib import Path

# The order is the order in which fetch_models.py produces them and reports them.
MODEL_NAMES: tuple[str, ...] = ("mobilenetv2", "ppocr_rec", "minilm", "mnist", "resnet18", "dwstack", "conv1d_seq", "bytecnn", "detector", "mpnet")

# Every one of these must be present for a model to count as fetched. fetch_models.py writes a
# model's folder under a temporary name and renames it at the end, so a half-written folder never
# passes this test.
MODEL_FILES: tuple[str, ...] = ("model.onnx", "calibration.npz", "eval.npz", "info.json")

CACHE_ENV = "ONNXSPARSE_MODEL_CACHE"
FETCH_COMMAND = "python3 tools/fetch_models.py"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``override``, else ``$ONNXSPARSE_MODEL_CACHE``, else ``~/.cache/onnxsparse/models``.

    Never inside the repository: the models are hundreds of MB and are rebuilt from packages.
    """
    if override is not None:
        return Path(override).expanduser().resolve()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser().resolve()
    return (Path.home() / ".cache" / "onnxsparse" / "models").resolve()


def model_dir(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return cache_dir(cache) / name


def is_present(name: str, cache: str | os.PathLike[str] | None = None) -> bool:
    folder = model_dir(name, cache)
    return all((folder / file).is_file() for file in MODEL_FILES)


def available_models(cache: str | os.PathLike[str] | None = None) -> list[str]:
    """The models whose folder is complete in the cache, in MODEL_NAMES order."""
    return [name for name in MODEL_NAMES if is_present(name, cache)]
