"""Copy PP-OCRv4's text-line recogniser (a PaddlePaddle export) and render text lines to read.

Run by tools/fetch_models.py in the tools venv:  python export_ppocr_rec.py --out DIR

Model: ``models/ch_PP-OCRv4_rec_infer.onnx`` shipped in the PyPI package ``rapidocr-onnxruntime``,
copied byte for byte: it is the paddle2onnx export as deployed (weights in Constant nodes, IR 8,
opset 12), which is exactly the kind of file the optimizer must cope with. The CTC dictionary is in
the model's metadata (``character``, one per line), as rapidocr reads it; decoding adds the blank at
index 0 and a space at the end (rapidocr's CTCLabelDecode).

Task data: short English text lines (words and digits) rendered with PIL in matplotlib's DejaVu
fonts, black on white, cut to the text's box plus a margin (what the detector would hand over),
then preprocessed as rapidocr's TextRecognizer.resize_norm_img does: height 48 keeping the aspect
ratio, (x/255 - 0.5)/0.5, CHW, zero-padded on the right to width 320. DejaVu has no CJK glyphs, so
every line uses only characters that are both in the font and in the model's dictionary (checked).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

from realmodels import _export

PACKAGE = "rapidocr-onnxruntime"
MODEL_FILE = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
INPUT_NAME = "x"
HEIGHT, WIDTH = 48, 320  # rapidocr config.yaml rec_img_shape [3, 48, 320]
FONT_SIZE = 32
MARGIN = (8, 6)  # left/right, top/bottom pixels around the text box
BATCH_SIZE = 8
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf")

# Disjoint by construction: different strings. Calibration renders each line in two fonts.
CALIBRATION_LINES = (
    "Invoice 24-0117", "Total 48.90 EUR", "Open 9 to 5", "Platform 3", "Room 214B",
    "Call 555-0199", "Exit only", "Use by 12/08", "Batch No. 77312", "Order 4521",
    "Speed limit 50", "Gate 12", "Sale 30% off", "Version 2.4.1", "Floor 7", "Page 18 of 240",
    "Ticket 000731", "Chapter 9", "Net weight 500g", "Model X200", "Route 66", "Apartment 4C",
    "Serial 8F3K2", "Temperature 21", "Level B2", "Box 14 of 20", "Section A-17", "Price 3.99",
    "Bus 42 Airport", "Lot 2291", "Parking P4", "Year 1987",
)
EVAL_LINES = (
    "Station Road 18", "Monday 0830", "Receipt 66120", "Aisle 5", "Hello World", "Flight LH 1234",
    "Zone 3 only", "Total due 129.00", "Track 7", "Size 42", "No entry", "Dock 11", "Pack of 24",
    "Phone 0800 123", "Code 7A9B", "Main Street 401", "Volume 3", "Row 26 Seat 14", "Weight 2.5 kg",
    "Item 5593", "Open 24 hours", "Block C", "Unit 909", "Quantity 250", "Day 365", "Bay 6",
    "Menu 4.50", "Lane 19", "Case 31 of 48", "Area 51", "Tuesday 1445", "Level 12",
)


def font_path(name: str) -> Path:
    return _export.package_file("matplotlib", f"matplotlib/mpl-data/fonts/ttf/{name}")


def dictionary(model: onnx.ModelProto) -> list[str]:
    """The model's characters as rapidocr reads them (metadata ``character``, splitlines)."""
    metadata = {p.key: p.value for p in model.metadata_props}
    if "character" not in metadata:
        raise KeyError("the recogniser has no 'character' metadata: cannot decode its output")
    return metadata["character"].splitlines()


def decode_table(characters: list[str]) -> list[str]:
    """Class index -> string: blank at 0 (decodes to nothing), the dictionary, then a space."""
    return ["", *characters, " "]


def check_characters(lines: tuple[str, ...], table: list[str], fonts: tuple[str, ...]) -> None:
    known = set(table[1:])
    for name in fonts:
        cmap = TTFont(font_path(name)).getBestCmap()
        for line in lines:
            missing = sorted({c for c in line if ord(c) not in cmap or c not in known})
            if missing:
                raise ValueError(f"{line!r} uses {missing}, not in {name} or not in the model's dictionary")


def render(text: str, font_name: str) -> Image.Image:
    """Black text on white, cut to the text's box plus a margin, as RGB."""
    font = ImageFont.truetype(str(font_path(font_name)), FONT_SIZE)
    left, _, right, _ = font.getbbox(text)
    # Box height from the font's full ascent+descent, not this line's glyphs: a line without
    # ascenders would otherwise be scaled up more than one with them.
    ascent, descent = font.getmetrics()
    width, height = right - left + 2 * MARGIN[0], ascent + descent + 2 * MARGIN[1]
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((MARGIN[0] - left, MARGIN[1]), text, font=font, fill="black")
    return image


def resize_norm(image: Image.Image, text: str = "") -> np.ndarray:
    """rapidocr TextRecognizer.resize_norm_img for one line with max_wh_ratio = 320/48."""
    ratio = image.width / image.height
    resized_w = min(WIDTH, math.ceil(HEIGHT * ratio))
    if math.ceil(HEIGHT * ratio) > WIDTH:
        # rapidocr would squeeze it to 320 (or widen the whole batch): keep the lines short instead.
        raise ValueError(f"line {text!r} too long for width {WIDTH} (aspect {ratio:.1f})")
    array = np.asarray(image.resize((resized_w, HEIGHT), Image.Resampling.BILINEAR), dtype=np.float32)
    array = (array.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    padded = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)  # zero after normalisation, as rapidocr pads
    padded[:, :, :resized_w] = array
    return padded


def dataset(samples: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    return {
        INPUT_NAME: np.stack([resize_norm(render(text, font), text) for text, font in samples]),
        "text": np.array([text for text, _ in samples]),
        "font": np.array([font for _, font in samples]),
    }


def main(out: Path) -> None:
    source = _export.package_file(PACKAGE, MODEL_FILE)
    shutil.copyfile(source, out / "model.onnx")
    model = onnx.load(str(out / "model.onnx"))
    characters = dictionary(model)
    table = decode_table(characters)
    check_characters(CALIBRATION_LINES + EVAL_LINES, table, FONTS)
    (out / "keys.txt").write_text("\n".join(characters) + "\n", encoding="utf-8")

    calibration_samples = [(text, font) for i, text in enumerate(CALIBRATION_LINES) for font in (FONTS[0], FONTS[1 + i % 3])]
    eval_samples = [(text, FONTS[i % len(FONTS)]) for i, text in enumerate(EVAL_LINES)]
    calibration = dataset(calibration_samples)
    evaluation = {**dataset(eval_samples), "charset": np.array(table)}
    _export.save_npz(out / "calibration.npz", calibration)
    _export.save_npz(out / "eval.npz", evaluation)

    info = {
        "name": "ppocr_rec",
        "task": "ctc-text-recognition",
        "batch_size": BATCH_SIZE,
        "source": {
            "package": PACKAGE,
            "version": _export.package_version(PACKAGE),
            "file": MODEL_FILE,
            "sha256": _export.sha256(source),
            "what": "PaddleOCR PP-OCRv4 Chinese/English text-line recogniser (SVTR-LCNet, CTC head), paddle2onnx export",
        },
        "exporter": {
            "name": "copied as shipped (paddle2onnx export by the rapidocr project); IR version and opset kept",
            "version": "n/a",
            "settings": {},
        },
        "provenance": "Real trained PP-OCRv4 weights; task data are text lines rendered here with matplotlib's DejaVu fonts.",
        "preprocessing": "RGB text line, resize to height 48 keeping aspect (bilinear; rapidocr uses cv2 INTER_LINEAR), "
        "(x/255 - 0.5)/0.5, CHW, zero-padded on the right to width 320",
        "dictionary": {
            "from": "model metadata 'character' (splitlines), as rapidocr's OrtInferSession.get_character_list",
            "classes": len(table),
            "decode": "eval.npz 'charset': index 0 = CTC blank (empty string), 1..N = keys.txt lines, last = space",
            "file": "keys.txt",
        },
        "calibration": {
            "size": len(calibration[INPUT_NAME]),
            "split": f"{len(CALIBRATION_LINES)} strings (disjoint from eval), each rendered in DejaVuSans and one of "
            "DejaVuSerif / DejaVuSans-Bold / DejaVuSansMono; keys 'text', 'font'",
        },
        "eval": {
            "size": len(evaluation[INPUT_NAME]),
            "split": f"{len(EVAL_LINES)} other strings, one rendering each, fonts cycling DejaVuSans, DejaVuSerif, "
            "DejaVuSans-Bold, DejaVuSansMono; keys 'text' (ground truth), 'font', 'charset'",
        },
        "not_covered": "Chinese characters: no font with CJK glyphs ships in these packages (DejaVu has none).",
    }
    _export.finish(out, info, task_metric_keys=["fp32_exact_match", "fp32_cer"])
    print_readings(out)


def print_readings(out: Path) -> None:
    from realmodels.metrics import ctc_greedy_decode
    from realmodels.tasks import load_task_from

    task = load_task_from(out)
    texts = ctc_greedy_decode(task.run(), [str(c) for c in task.eval_data["charset"]])
    for truth, read in zip(task.eval_data["text"], texts):
        print(f"{'ok ' if str(truth) == read.strip() else 'BAD'} {str(truth)!r:20} -> {read!r}")


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
