"""Hostile and broken inputs (issue 15): each ends with exit 2 and one line naming the file and the
problem, before memory is committed; nothing is written and every input stays byte-identical."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import helper, numpy_helper

from onnxsparse.calibration import parse_dims
from onnxsparse.cli import main
from onnxsparse.errors import InputDataError
from onnxsparse.limits import parse_bytes
from onnxsparse.validation import Tolerance

CNN = MODELS / "digits_cnn.onnx"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) by its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ bad files, built in a folder


def non_utf8_name(folder: Path) -> Path:
    """The issue's fuzz find: bytes 889-890 of the bundled transformer set to ff 80 (inside a tensor name)."""
    data = bytearray((MODELS / "digits_transformer.onnx").read_bytes())
    data[889:891] = b"\xff\x80"
    return write(folder / "utf.onnx", bytes(data))


def raw_data_longer_than_its_shape(folder: Path) -> Path:
    model = onnx.load(CNN)
    model.graph.initializer[0].raw_data += b"\0" * 8
    return write(folder / "long.onnx", model.SerializeToString())


def float_data_shorter_than_its_shape(folder: Path) -> Path:
    model = onnx.load(CNN)
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight).reshape(-1)[:-3]
    weight.ClearField("raw_data")
    weight.float_data.extend(values.tolist())
    return write(folder / "short.onnx", model.SerializeToString())


def sparse_initializer_of(elements: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        values = numpy_helper.from_array(np.ones(2, np.float32), "w")
        indices = numpy_helper.from_array(np.array([0, 5], np.int64), "w_indices")
        graph = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [elements])],
            sparse_initializer=[helper.make_sparse_tensor(values, indices, [elements])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        return write(folder / f"sparse{elements.bit_length() - 1}.onnx", model.SerializeToString())

    return build


def graph_input_of(batch: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        model = onnx.load(CNN)
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
        return write(folder / f"input{batch.bit_length() - 1}.onnx", model.SerializeToString())

    return build


def negative_variance(folder: Path) -> Path:
    """A BatchNorm whose variance is negative: every output of the original is NaN."""
    model = onnx.load(CNN)
    variance = next(n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization")
    for tensor in model.graph.initializer:
        if tensor.name == variance:
            tensor.CopyFrom(numpy_helper.from_array(-np.abs(numpy_helper.to_array(tensor)) - 1, variance))
    return write(folder / "negvar.onnx", model.SerializeToString())


def zip_bomb(folder: Path) -> Path:
    """A .npz whose 64 MiB of zeros deflate to ~64 KB (the issue's 4 MB -> 4 GB, scaled down)."""
    path = folder / "bomb.npz"
    np.savez_compressed(path, input=np.zeros(16 * 2**20, np.float32))
    return path


def npz_header_declaring(shape: tuple[int, ...], data_bytes: int = 64) -> Callable[[Path], Path]:
    """A .npz whose member's .npy header declares ``shape`` float32 but holds ``data_bytes``."""

    def build(folder: Path) -> Path:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
        path = folder / "header.npz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("input.npy", header.getvalue() + b"\0" * data_bytes)
        return path

    return build


def npz_with(value: float, name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        with np.load(MODELS / "digits_cnn.inputs.npz") as archive:
            arrays = {key: archive[key].copy() for key in archive.files}
        arrays["input"][3, 0, 2, 2] = value
        path = folder / name
        np.savez(path, **arrays)
        return path

    return build


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def reports_in(folder: Path) -> list[str]:
    """Reports asked for too: on a bad input they must not be written either."""
    return ["--report", str(folder / "r.json"), "--markdown", str(folder / "r.md")]


def model_case(build: Callable[[Path], Path], *extra: str) -> Callable[[Path], list[str]]:
    return lambda d: ["optimize", str(build(d)), "-o", str(d / "out.onnx"), "-p", "cleanup", *reports_in(d), *extra]


def cnn_case(*extra: str, pipeline: str = "cleanup") -> Callable[[Path], list[str]]:
    return lambda d: ["optimize", str(d / "model.onnx"), "-o", str(d / "out.onnx"), "-p", pipeline, *reports_in(d),
                      *[a(d) if callable(a) else a for a in extra]]


def path_of(build: Callable[[Path], Path]) -> Callable[[Path], str]:
    return lambda d: str(build(d))


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "non-UTF-8 name": (model_case(non_utf8_name), r"utf.onnx: model.graph.node[5].input[1] is not UTF-8 text"),
    "non-UTF-8 name (inspect)": (lambda d: ["inspect", str(non_utf8_name(d))], "utf.onnx: model.graph.node[5].input[1] is not UTF-8"),
    "raw_data too long": (model_case(raw_data_longer_than_its_shape), "long.onnx: tensor 'stem.0.weight' declares shape [16, 1, 3, 3] of FLOAT (576 bytes of raw_data) but holds 584"),
    "float_data too short": (model_case(float_data_shorter_than_its_shape), "short.onnx: tensor 'stem.0.weight' declares shape [16, 1, 3, 3] of FLOAT (144 values in float_data) but holds 141"),
    "sparse 2^31": (model_case(sparse_initializer_of(2**31)), "sparse31.onnx: sparse tensor 'w' declares shape [2147483648] (8.0 GiB once dense)"),
    "sparse 2^40 (inspect)": (lambda d: ["inspect", str(sparse_initializer_of(2**40)(d))], "sparse40.onnx: sparse tensor 'w' declares shape [1099511627776] (4.0 TiB once dense)"),
    "graph input 2^31": (model_case(graph_input_of(2**31)), "input 'input' of shape [2147483648, 1, 8, 8]: 1.0 TiB), over the 4.0 GiB input budget"),
    "graph input 2^40": (model_case(graph_input_of(2**40)), "input 'input' of shape [1099511627776, 1, 8, 8]"),
    "dims batch=100000000": (cnn_case("--dims", "batch=100000000"), "synthetic inputs: one feed would take 47.7 GiB"),
    "dims with 30 digits": (cnn_case("--dims", "batch=" + "9" * 30), "--dims: 'batch=999999999999999999999999999999' is not NAME=POSITIVE_INTEGER"),
    "seed -1": (cnn_case("--seed", "-1"), "--seed: -1 is negative"),
    "budget not a size": (cnn_case("--max-input-bytes", "lots"), "--max-input-bytes: 'lots' is not a size"),
    "zip bomb over the budget": (cnn_case("--inputs", path_of(zip_bomb), "--max-input-bytes", "16M"), "bomb.npz: its arrays inflate to 64.0 MiB"),
    "zip bomb within the budget": (cnn_case("--inputs", path_of(zip_bomb), "--max-input-bytes", "512M"),
                                   "to 64.0 MiB: a zip bomb or constant data; refused before inflating"),
    "npz header 2^40 (inputs)": (cnn_case("--inputs", path_of(npz_header_declaring((2**40, 1, 8, 8)))),
                                 "header.npz: member 'input.npy' declares an array of shape [1099511627776, 1, 8, 8] float32 (256.0 TiB), over the 4.0 GiB input budget"),
    "npz header 2^40 (calibration)": (cnn_case("--calibration", path_of(npz_header_declaring((2**40, 1, 8, 8))), pipeline="qdq"),
                                      "header.npz: member 'input.npy' declares an array of shape [1099511627776, 1, 8, 8]"),
    "npz header beyond its data": (cnn_case("--inputs", path_of(npz_header_declaring((4, 1, 8, 8)))),
                                   "header.npz: member 'input.npy' declares an array of shape [4, 1, 8, 8] float32 (1,024 bytes) but holds 64 bytes"),
    "NaN validation input": (cnn_case("--inputs", path_of(npz_with(np.nan, "nan.npz"))), "nan.npz: input 'input' holds 1 NaN/Inf value(s), first at index (3, 0, 2, 2)"),
    "Inf calibration input": (cnn_case("--calibration", path_of(npz_with(np.inf, "inf.npz")), pipeline="qdq"), "inf.npz: input 'input' holds 1 NaN/Inf value(s)"),
    "all-NaN original": (model_case(negative_variance), "negvar.onnx (original): output 'logits' is NaN/Inf in 160 of 160 values on the 16 validation sample(s)"),
    "negative tolerance": (cnn_case("--tolerance", "max_rel=-1"), "--tolerance: tolerance max_rel=-1 is outside [0, inf]"),
    "top-1 bound above 1": (cnn_case("--pass-tolerance", "cleanup:min_top1=1.5"), "tolerance min_top1=1.5 is outside [0, 1]"),
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(CNN, tmp_path / "model.onnx")
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(workdir, capsys, case):
    build_args, expected = CASES[case]
    args = build_args(workdir)
    before = snapshot(workdir)

    status = main(args)

    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("onnxsparse: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert snapshot(workdir) == before  # no output, no report, no staging or lock file, inputs byte-identical


def test_budget_can_be_raised_for_a_big_but_honest_input(workdir, capsys):
    big = workdir / "big.npz"
    np.savez_compressed(big, input=np.random.default_rng(0).standard_normal((1024, 1, 8, 8)).astype(np.float32))  # 256 KiB inflated
    assert main(["optimize", str(workdir / "model.onnx"), "-o", str(workdir / "o.onnx"), "-p", "cleanup", "--inputs", str(big), "--max-input-bytes", "100K"]) == 2
    assert "over the 100.0 KiB input budget" in capsys.readouterr().err
    assert main(["optimize", str(workdir / "model.onnx"), "-o", str(workdir / "o.onnx"), "-p", "cleanup", "--inputs", str(big), "--max-input-bytes", "1M"]) == 0
    assert (workdir / "o.onnx").is_file()


def test_the_bundled_inputs_and_models_pass_every_check(workdir):
    for name in ("digits_cnn", "digits_transformer", "digits_sklearn_mlp"):
        assert main(["optimize", str(MODELS / f"{name}.onnx"), "-o", str(workdir / f"{name}.onnx"), "-p", "cleanup", "--inputs",
                     str(MODELS / f"{name}.inputs.npz"), "--calibration", str(MODELS / f"{name}.calibration.npz")]) == 0


def test_nan_in_a_python_feed_names_the_feed_and_input():
    from onnxsparse.calibration import check_feed, model_inputs

    model = onnx.load(CNN)
    feed = {"input": np.full((2, 1, 8, 8), np.inf, np.float32)}
    with pytest.raises(InputDataError, match=r"my feeds, feed 7: input 'input' holds 128 NaN/Inf value\(s\), first at index \(0, 0, 0, 0\)"):
        check_feed(feed, model_inputs(model), "my feeds, feed 7")


@pytest.mark.parametrize("bounds", [{"max_abs": -1e-9}, {"max_kl": -1.0}, {"min_cosine": 1.5}, {"min_cosine": -1.5}, {"min_agreement": 2.0}, {"min_top1": -0.1}])
def test_a_tolerance_no_metric_can_meet_is_refused(bounds):
    with pytest.raises(InputDataError, match="is outside"):  # the one exception family, from Python too
        Tolerance(**bounds)


def test_the_loosest_tolerances_are_still_accepted():
    Tolerance(max_abs=0.0, max_rel=float("inf"), min_cosine=-1.0, min_top1=0.0, min_agreement=1.0, max_kl=0.0)


@pytest.mark.parametrize("text, count", [("4G", 4 * 2**30), ("512M", 512 * 2**20), ("1000000", 10**6), ("1.5GiB", 3 * 2**29), ("64kb", 65536)])
def test_sizes_parse_in_binary_units(text, count):
    assert parse_bytes(text) == count


@pytest.mark.parametrize("text", ["", "0", "-1G", "4Q", "G"])
def test_sizes_that_are_not_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_dims_keep_accepting_ordinary_values():
    assert parse_dims("batch=4, seq=128") == {"batch": 4, "seq": 128}


def test_a_negative_seed_from_python_is_an_input_error_and_numpy_seeds_are_accepted(workdir):
    from onnxsparse import optimize

    with pytest.raises(InputDataError, match="--seed: -1 is not a non-negative integer"):
        optimize(workdir / "model.onnx", workdir / "o.onnx", "cleanup", seed=-1)
    assert not (workdir / "o.onnx").exists()
    optimize(workdir / "model.onnx", workdir / "o.onnx", "cleanup", seed=np.int64(3))
    assert (workdir / "o.onnx").is_file()
