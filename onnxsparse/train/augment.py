"""Generic variations of training batches for distillation: the student and the teacher see the same
varied samples, so no label is needed and a small calibration set stands for more than its samples.

Image transforms apply to float inputs of rank 4 ([N, C, H, W], the layout of every exported vision
model we know); mixup applies when every input is float (token ids cannot be mixed). A transform
that fits no input of a model is reported, not silently dropped (:func:`applicable`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

AUGMENTATIONS = ("flip", "crop", "jitter", "mixup")
CROP_SIDE = (0.6, 1.0)  # share of each side a crop keeps, drawn uniformly
JITTER = (0.8, 1.2)  # brightness and contrast factors, drawn uniformly
MIXUP_ALPHA = 0.4  # Beta(alpha, alpha) mixing weights: mostly near one sample, sometimes halfway


def applicable(augment: tuple[str, ...], inputs: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The transforms of ``augment`` that the model's inputs allow."""
    images = any(_is_image(value) for value in inputs.values())
    all_float = all(value.dtype.kind == "f" for value in inputs.values())
    return tuple(a for a in augment if (a == "mixup" and all_float) or (a != "mixup" and images))


def augmented(batch: Mapping[str, np.ndarray], augment: tuple[str, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``batch`` (samples on axis 0) with each transform of ``augment`` applied, drawn per sample."""
    out = {name: np.array(value) for name, value in batch.items()}
    for name, value in out.items():
        if not _is_image(value):
            continue
        if "crop" in augment:
            value = _crop_and_resize(value, rng)
        if "flip" in augment:
            flipped = rng.random(len(value)) < 0.5
            value[flipped] = value[flipped, ..., ::-1]
        if "jitter" in augment:
            value = _jitter(value, rng)
        out[name] = np.ascontiguousarray(value, dtype=batch[name].dtype)
    if "mixup" in augment and len(next(iter(out.values()))) > 1:
        weight = rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, size=len(next(iter(out.values())))).astype(np.float32)
        partner = rng.permutation(len(weight))
        for name, value in out.items():
            w = weight.reshape(-1, *[1] * (value.ndim - 1))
            out[name] = (w * value + (1 - w) * value[partner]).astype(value.dtype)
    return out


def _is_image(value: np.ndarray) -> bool:
    return value.ndim == 4 and value.dtype.kind == "f"


def _crop_and_resize(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image cropped to a random box of CROP_SIDE of its sides and resized back (bilinear)."""
    count, _, height, width = images.shape
    out = np.empty_like(images)
    for index in range(count):
        side = rng.uniform(*CROP_SIDE)
        h, w = max(2, round(height * side)), max(2, round(width * side))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        out[index] = _bilinear(images[index, :, top : top + h, left : left + w], height, width)
    return out


def _bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, h, w] -> [C, height, width], sampling at pixel centres (align_corners=False)."""
    rows = _taps(image.shape[1], height)
    cols = _taps(image.shape[2], width)
    top = image[:, rows[0]] * (1 - rows[2])[None, :, None] + image[:, rows[1]] * rows[2][None, :, None]
    return top[:, :, cols[0]] * (1 - cols[2]) + top[:, :, cols[1]] * cols[2]


def _taps(size: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two source indices and the weight of the second."""
    position = np.clip((np.arange(target) + 0.5) * size / target - 0.5, 0, size - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    return low, high, (position - low).astype(np.float32)


def _jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per image: contrast about its mean, then brightness, each by a factor drawn from JITTER."""
    shape = (len(images), 1, 1, 1)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(*JITTER, size=shape).astype(images.dtype)
    brightness = rng.uniform(*JITTER, size=shape).astype(images.dtype)
    return ((images - mean) * contrast + mean) * brightness
