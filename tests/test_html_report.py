"""``optimize --report r.html``: the run report as one self-contained page, read back as XML and drawn
by a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from xml.etree import ElementTree

import numpy as np
import pytest
from conftest import MODELS, screenshot_pixels

from onnxsparse import optimize
from onnxsparse.cli import main

SVG = "{http://www.w3.org/2000/svg}"
CNN = {"model": MODELS / "digits_cnn.onnx", "inputs": str(MODELS / "digits_cnn.inputs.npz"),
       "calibration": str(MODELS / "digits_cnn.calibration.npz")}


def _page(path) -> ElementTree.Element:
    return ElementTree.fromstring(path.read_text().split("\n", 1)[1])  # well-formed XML once the doctype line is off


def _qdq_report(folder, name: str = "r.html") -> int:
    folder.mkdir(exist_ok=True)
    return main(["optimize", str(CNN["model"]), "-o", str(folder / "q.onnx"), "-p", "qdq{mode=static sensitivity=true never_slower=false}",
                 "--inputs", CNN["inputs"], "--calibration", CNN["calibration"], "--report", str(folder / name)])


def test_a_report_named_html_is_a_page_with_every_step_each_nodes_error_alone_and_what_it_became(tmp_path):
    assert _qdq_report(tmp_path / "html") == 0
    assert _qdq_report(tmp_path / "json", "r.json") == 0  # any other name: the JSON report, as before
    report = json.loads((tmp_path / "json" / "r.json").read_text())
    page = _page(tmp_path / "html" / "r.html")
    text = "".join(page.itertext())
    assert "onnxsparse optimize" in page.find(".//title").text and "Final validation against the input: passed" in text
    tables = page.findall(".//table")
    steps = tables[1].findall("tr")[1:]
    assert len(steps) == 1 and "qdq{mode=static" in "".join(steps[0].itertext())
    scanned = report["steps"][0]["figures"]["sensitivity"]
    bars = [rect for rect in page.iter(f"{SVG}rect") if "bar" in rect.get("class", "")]
    assert len(bars) == min(len(scanned), 30) and {b.get("class") for b in bars} <= {"bar int8", "bar float"}
    layers = tables[-1].findall("tr")[1:]
    step = report["steps"][0]
    assert len(layers) == len(step["changes"]) + len(step["skipped"])  # every node it quantized or left alone, with the reason


def test_mixed_precision_draws_each_tensors_drift_alone_in_the_colour_of_its_format(tmp_path):
    transformer = MODELS / "digits_transformer"
    optimize(f"{transformer}.onnx", tmp_path / "m.onnx", "mixed-precision{min_elements=256}", inputs=f"{transformer}.inputs.npz",
             calibration=f"{transformer}.calibration.npz", report_path=tmp_path / "m.html")
    page = _page(tmp_path / "m.html")
    kinds = {rect.get("class") for rect in page.iter(f"{SVG}rect")}
    assert kinds and kinds <= {"bar fp16", "bar cluster8", "bar int4", "bar cluster4"}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is installed by the README's test command")
def test_the_run_report_renders_in_a_headless_browser(tmp_path):
    assert _qdq_report(tmp_path / "html") == 0
    shot = tmp_path / "shot.png"
    completed = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,1400", f"--screenshot={shot}",
         (tmp_path / "html" / "r.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.exists(), completed.stderr[-2000:]
    pixels = screenshot_pixels(shot)
    blue = np.all(np.abs(pixels[..., :3].astype(int) - (0x2B, 0x7B, 0xB9)) <= 8, axis=-1)  # the int8 nodes' bars
    assert blue.sum() >= 200, "no sensitivity bar drawn"
