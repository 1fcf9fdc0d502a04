"""Build a transformer-like ONNX model of a chosen size with its weights in external data, for the
large-model benchmarks (issue #16: a model over 2 GB is an ordinary case).

Each block is LayerNormalization -> MatMul [H, 4H] -> Add -> GELU (the Erf form exporters write at
opset 17) -> MatMul [4H, H] -> Add -> residual Add, on an input [batch, seq, H]. The weights are
written straight into the data file, one tensor at a time, so building a 2.3 GB model never holds
more than one tensor in memory, and never makes a protobuf message over 2 GB.

    python3 tools/big_model.py /tmp/big/model.onnx --hidden 2048 --size-mb 2350
    python3 tools/big_model.py /tmp/mid/model.onnx --hidden 1024 --size-mb 168
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 10


class DataFile:
    """Appends tensors to one external data file and returns their (external) TensorProtos."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = path.open("wb")

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        offset = self.handle.tell()
        padding = -offset % 4096  # page-aligned: onnxruntime can map such a tensor instead of reading it
        self.handle.write(b"\0" * padding)
        offset += padding
        data = np.ascontiguousarray(array).tobytes()
        self.handle.write(data)
        proto = helper.make_tensor_value_info(name, TensorProto.FLOAT, array.shape)  # only for its type
        tensor = TensorProto(name=name, data_type=proto.type.tensor_type.elem_type, dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        self.handle.close()


def build(path: Path, hidden: int, blocks: int, seed: int) -> int:
    """Write the model and its data beside it; return the data file's size in bytes."""
    rng = np.random.default_rng(seed)
    data = DataFile(path.with_name(path.name + ".data"))
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], scale: float) -> str:
        initializers.append(data.tensor(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))))
        return name

    def small(name: str, array: np.ndarray) -> str:
        initializers.append(helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.astype(np.float32).ravel().tolist()))
        return name

    half, root_half = small("half", np.array(0.5)), small("inv_sqrt2", np.array(1 / math.sqrt(2)))
    one = small("one", np.array(1.0))
    x = "x"
    for block in range(blocks):
        p = f"block{block}"
        gamma = weight(f"{p}.ln.weight", (hidden,), 0.1)
        beta = weight(f"{p}.ln.bias", (hidden,), 0.1)
        nodes.append(helper.make_node("LayerNormalization", [x, gamma, beta], [f"{p}.ln"], name=f"{p}.ln", axis=-1, epsilon=1e-5))
        w1 = weight(f"{p}.fc1.weight", (hidden, 4 * hidden), 1 / math.sqrt(hidden))
        b1 = weight(f"{p}.fc1.bias", (4 * hidden,), 0.02)
        nodes.append(helper.make_node("MatMul", [f"{p}.ln", w1], [f"{p}.fc1.mm"], name=f"{p}.fc1"))
        nodes.append(helper.make_node("Add", [f"{p}.fc1.mm", b1], [f"{p}.fc1.out"], name=f"{p}.fc1.add"))
        # GELU as exporters write it at opset 17: 0.5 * x * (1 + erf(x / sqrt(2)))
        nodes.append(helper.make_node("Mul", [f"{p}.fc1.out", root_half], [f"{p}.g0"], name=f"{p}.gelu.div"))
        nodes.append(helper.make_node("Erf", [f"{p}.g0"], [f"{p}.g1"], name=f"{p}.gelu.erf"))
        nodes.append(helper.make_node("Add", [f"{p}.g1", one], [f"{p}.g2"], name=f"{p}.gelu.add"))
        nodes.append(helper.make_node("Mul", [f"{p}.fc1.out", f"{p}.g2"], [f"{p}.g3"], name=f"{p}.gelu.mul"))
        nodes.append(helper.make_node("Mul", [f"{p}.g3", half], [f"{p}.gelu"], name=f"{p}.gelu.half"))
        w2 = weight(f"{p}.fc2.weight", (4 * hidden, hidden), 1 / math.sqrt(4 * hidden))
        b2 = weight(f"{p}.fc2.bias", (hidden,), 0.02)
        nodes.append(helper.make_node("MatMul", [f"{p}.gelu", w2], [f"{p}.fc2.mm"], name=f"{p}.fc2"))
        nodes.append(helper.make_node("Add", [f"{p}.fc2.mm", b2], [f"{p}.fc2.out"], name=f"{p}.fc2.add"))
        nodes.append(helper.make_node("Add", [x, f"{p}.fc2.out"], [f"{p}.out"], name=f"{p}.residual"))
        x = f"{p}.out"
    gamma, beta = weight("final.ln.weight", (hidden,), 0.1), weight("final.ln.bias", (hidden,), 0.1)
    nodes.append(helper.make_node("LayerNormalization", [x, gamma, beta], ["y"], name="final.ln", axis=-1, epsilon=1e-5))
    data.close()
    graph = helper.make_graph(
        nodes, "transformer_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxsparse tools/big_model.py")
    model.ir_version = IR_VERSION
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)
    return data.path.stat().st_size


def block_bytes(hidden: int) -> int:
    return 4 * (8 * hidden * hidden + 7 * hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="the .onnx file to write (its data goes beside it, OUTPUT.data)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--size-mb", type=float, default=2350.0, help="about how large the weights should be (MB, 10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    blocks = max(1, round(args.size_mb * 1e6 / block_bytes(args.hidden)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    size = build(args.output, args.hidden, blocks, args.seed)
    print(f"{args.output}: {blocks} blocks, hidden {args.hidden}, {size / 1e6:.0f} MB of external data")


if __name__ == "__main__":
    main()
