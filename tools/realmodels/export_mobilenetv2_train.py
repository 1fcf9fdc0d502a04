"""A training split for the MobileNetV2 benchmark: photographs shipped in Debian's wallpaper packages.

`distill{data=train.npz}` trains on samples of its own, and MobileNetV2's calibration set is 48 photos:
too few for a student to generalise to photos it has not seen (#18). Debian ships real photographs as
desktop wallpapers; the 37 below (flowers, insects, landscapes, water, a dog, objects on tables, chosen
by looking at every image of the four packages: the rest are drawings and renders) are none of the
calibration or eval photos. Each becomes TRAIN_VIEWS views by the calibration set's own transform
(center crop, its flip, random resized crops), unlabelled. Written: ``<cache>/mobilenetv2/train.npz``,
the calibration set's 384 views first (``data=`` replaces the calibration data as what distill trains
on, and every photo counts: half-width MobileNetV2 lowered its held-out loss only with both sets),
then the 592 of the wallpapers.

Needs Debian's apt-get and dpkg-deb (the packages are downloaded, never installed) and the tools venv
(numpy, Pillow, torch for the export module it shares its transforms with):

    python3 tools/realmodels/export_mobilenetv2_train.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realmodels import _export  # noqa: E402
from realmodels.export_mobilenetv2 import UNLABELLED, Photo, augmented_views, labelled, stack  # noqa: E402
from realmodels.paths import cache_dir  # noqa: E402

TRAIN_VIEWS = 16  # per photo: the wallpapers are 1920 px wide and more, so crops differ more than a small photo's
TRAIN_SEED = 2  # its own generator (calibration uses 0 and 1)
# (Debian package, file inside it): photographs only
PHOTOS: tuple[tuple[str, str], ...] = (
    *(("lomiri-wallpapers-16.04", f"usr/share/backgrounds/{name}.jpg") for name in (
        "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede",
        "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")),
    *(("lomiri-wallpapers-20.04", f"usr/share/backgrounds/{name}.jpg") for name in ("Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus")),
    *(("mate-backgrounds", f"usr/share/backgrounds/mate/nature/{name}.jpg") for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood",
        "YellowFlower")),
    *(("plasma-workspace-wallpapers", f"usr/share/wallpapers/{name}/contents/images/{size}.jpg") for name, size in (
        ("BytheWater", "1920x1080"), ("ColdRipple", "1920x1080"), ("ColorfulCups", "2560x1600"), ("DarkestHour", "1920x1080"),
        ("EveningGlow", "1920x1080"), ("FallenLeaf", "1920x1080"), ("Grey", "1920x1080"), ("Kite", "1920x1080"),
        ("OneStandsOut", "1920x1080"), ("Path", "1920x1080"), ("Volna", "5120x2880"), ("summer_1am", "1920x1080"))),
)


def photos(folder: Path) -> list[Photo]:
    roots = _export.unpacked(sorted({package for package, _ in PHOTOS}), folder)
    found = []
    Image.MAX_IMAGE_PIXELS = None  # Volna is 5120 x 2880
    for package, inside in PHOTOS:
        root, version = roots[package]
        # views are named photo:view, so no ':' in the photo's name; plasma's photos are named by their folder
        name = f"{package}/{Path(inside).stem if package != 'plasma-workspace-wallpapers' else Path(inside).parts[3]}"
        found.append(Photo(name, Image.open(root / inside).convert("RGB"), f"Debian {package} {version}: /{inside}", UNLABELLED))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: the one tools/fetch_models.py fills)")
    args = parser.parse_args(argv)
    out = cache_dir(args.cache) / "mobilenetv2"
    if not (out / "model.onnx").exists():
        raise SystemExit(f"{out}: no MobileNetV2 export here: run tools/fetch_models.py --only mobilenetv2 first")
    rng = np.random.default_rng(TRAIN_SEED)
    with tempfile.TemporaryDirectory() as temporary:
        train = photos(Path(temporary))
        views = [view for photo in train for view in labelled(photo, augmented_views(photo, rng, TRAIN_VIEWS))]
    with np.load(out / "calibration.npz") as calibration:
        arrays = {key: np.concatenate([calibration[key], value]) for key, value in stack(views).items()}
    _export.save_npz(out / "train.npz", arrays)
    print(f"{out / 'train.npz'}: the {len(arrays['view']) - len(views)} calibration views, then {len(views)} views of {len(train)} wallpaper photos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
