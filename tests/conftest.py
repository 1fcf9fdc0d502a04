"""Shared helpers: models built from ONNX text, the bundled models, running in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
BUNDLED = ("digits_cnn", "digits_transformer", "digits_sklearn_mlp")


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text (onnx.parser), checked."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def with_initializers(model: onnx.ModelProto, **arrays: np.ndarray) -> onnx.ModelProto:
    for name, array in arrays.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name=name))
    return model


def run(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def bundled(name: str):
    """A bundled model (loaded as onnxsparse loads it) with its validation inputs and calibration data as sources."""
    from onnxsparse import load
    from onnxsparse.calibration import resolve_inputs

    model = load(MODELS / f"{name}.onnx")
    return model, resolve_inputs(str(MODELS / f"{name}.inputs.npz"), model), resolve_inputs(str(MODELS / f"{name}.calibration.npz"), model)


def bundled_inputs(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{name}.inputs.npz") as archive:
        return {"input": archive["input"]}


@pytest.fixture(autouse=True)
def pruning_pays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """channel-prune keeps its input when the pruned model does not run faster in onnxruntime. On
    tiny test graphs and a shared CI machine that timing is noise, so tests pin the pruned model
    at half its input's time; the tests of the guard itself set their own figure."""
    monkeypatch.setattr("onnxsparse.passes.channel_prune.budget.relative_latency", lambda *args, **kwargs: 0.5)


@pytest.fixture(autouse=True)
def steps_run_no_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass manager rolls back a step that runs slower than its input (or grew and is not
    faster). On tiny test graphs that timing is noise, so tests pin every timed step at 0.9x its
    input's time; the tests of that rule set their own figures. qdq's own timing of its candidates
    (never_slower, mode=auto) is pinned the same way, and two of its int8 forms timed against each
    other tie."""
    monkeypatch.setattr("onnxsparse.pipeline.relative_latency", lambda *args, **kwargs: 0.9)
    monkeypatch.setattr("onnxsparse.passes.qdq.quantize.relative_latency",
                        lambda reference, *args, **kwargs: 1.0 if is_quantized(reference) else 0.9)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# A Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> BatchNormalization chain.
CONV_BN_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 3, 8, 8] x) => (float[N, 4] y) <float[6, 3, 3, 3] w, float[6] b, float[6] g, float[6] beta, float[6] mean, float[6] var,
    float[4, 6] fw, float[4] fb, float[4] g2, float[4] beta2, float[4] mean2, float[4] var2> {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization <epsilon = 0.001> (c, g, beta, mean, var)
    r = Relu (n)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    h = Gemm <transB = 1, beta = 0.5> (f, fw, fb)
    y = BatchNormalization (h, g2, beta2, mean2, var2)
}
"""


def conv_bn_model(rng: np.random.Generator) -> onnx.ModelProto:
    model = onnx.parser.parse_model(CONV_BN_TEXT)
    del model.graph.initializer[:]
    f32 = np.float32
    return with_initializers(
        model,
        w=rng.standard_normal((6, 3, 3, 3)).astype(f32), b=rng.standard_normal(6).astype(f32),
        g=rng.uniform(0.5, 2, 6).astype(f32), beta=rng.standard_normal(6).astype(f32),
        mean=rng.standard_normal(6).astype(f32), var=rng.uniform(0.5, 2, 6).astype(f32),
        fw=rng.standard_normal((4, 6)).astype(f32), fb=rng.standard_normal(4).astype(f32),
        g2=rng.uniform(0.5, 2, 4).astype(f32), beta2=rng.standard_normal(4).astype(f32),
        mean2=rng.standard_normal(4).astype(f32), var2=rng.uniform(0.5, 2, 4).astype(f32),
    )


def record_tensor_values(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Make activations.tensor_values record the names each call asks for (in the list returned)."""
    from onnxsparse import activations

    asked: list[list[str]] = []
    real = activations.tensor_values

    def recording(model, source, names, **kwargs):  # noqa: ANN202 - the real function's signature
        asked.append(list(names))
        return real(model, source, names, **kwargs)

    monkeypatch.setattr(activations, "tensor_values", recording)
    return asked


def screenshot_pixels(path: Path) -> np.ndarray:
    """RGB(A) pixels of a non-interlaced 8-bit PNG, decoded with zlib (no imaging library needed)."""
    import struct
    import zlib

    data = path.read_bytes()
    offset, chunks, header = 8, [], b""
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), np.uint8).reshape(height, 1 + width * channels)
    rows: list[list[int]] = []
    previous = [0] * (width * channels)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].tolist()
        current = [0] * len(line)
        for i, value in enumerate(line):  # the PNG row filters: None, Sub, Up, Average, Paeth
            left = current[i - channels] if i >= channels else 0
            up, corner = previous[i], (previous[i - channels] if i >= channels else 0)
            if kind == 0:
                predictor = 0
            elif kind == 1:
                predictor = left
            elif kind == 2:
                predictor = up
            elif kind == 3:
                predictor = (left + up) // 2
            else:
                estimate = left + up - corner
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
                predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
            current[i] = (value + predictor) & 255
        rows.append(current)
        previous = current
    return np.array(rows, np.uint8).reshape(height, width, channels)
