"""What the tuner tries on a model: families of pipelines, each a ladder from mild to strong.

A family is climbed one rung at a time and left at the first rung over the budget (a stronger rung
of the same method is assumed to cost at least as much accuracy: channel ratios, sparsities); the
combinations come after the singles, built from the strongest rung of each family that held. Which
families exist depends on the model (its ops), the data (calibration makes int8 static, refit and
GPTQ possible) and the objective (formats that only make the file smaller join for ``size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx

Objective = Literal["latency", "size"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "size")

# Ops whose constant weights the passes below rewrite.
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})

# Rungs of the ladders: channel ratios and sparsities, mild to strong.
CHANNEL_RATIOS = (0.25, 0.5, 0.7)
SENSITIVITY = "sensitivity=true"
SPARSITIES = (0.5, 0.7, 0.85)
WEIGHT_BITS = (8, 4)
MIXED = "mixed precision"  # the family of one rung: each tensor in its own format, chosen against the budget
# for size, the smaller encoding per tensor (its load-time memory is the candidate's to measure)
ENCODE = "sparse-encode{format=auto}"
CODEBOOK_BITS = (8, 4)  # 256 centroids (uint8 indices, 0.25x) then 16 (uint4, 0.13x): below 8 bits uint8 indices save nothing more


@dataclass(frozen=True)
class Candidate:
    """One pipeline to build and measure. ``family`` groups the rungs of one ladder; ``rung`` is its
    place on it (0 = mildest); ``parts`` the families a combination is made of."""

    pipeline: str
    family: str
    rung: int = 0
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    rungs: tuple[str, ...]  # pipelines, mild to strong


def families(model: onnx.ModelProto, objective: Objective, *, calibration: bool) -> list[Family]:
    """The families worth trying on ``model`` for ``objective``."""
    weighted = _constant_inputs(model)
    convs = bool(weighted & _CONV_OPS)
    matmuls = bool(weighted & _MATMUL_OPS)
    found: list[Family] = []
    # Every candidate leaves speed to the tuner, which times the results one at a time: no pass
    # keeps its input for being slower, since a slower rung still tells where the frontier is.
    if calibration and (convs or matmuls):
        # its per-node sensitivity (each node's error alone) goes into the report's bars
        found.append(Family("int8 static", (f"qdq{{mode=static never_slower=false {SENSITIVITY}}}",)))
    if matmuls:
        dynamic = "qdq{mode=dynamic never_slower=false}"
        # for size, the embedding tables too: MiniLM 0.65x -> 0.26x the file, at some of int8's speed
        tables = (dynamic.replace("}", " embeddings=true}"),) if objective == "size" and "Gather" in _constant_data(model) else ()
        found.append(Family("int8 dynamic", (dynamic, *tables)))
    if convs or matmuls:
        refit = " refit=true" if calibration else ""
        found.append(Family("channels", tuple(f"channel-prune{{ratio={r}{refit} never_slower=false}}" for r in CHANNEL_RATIOS)))
    if objective == "size":
        found.append(Family("fp16", ("fp16",)))
        if "MatMul" in weighted:  # MatMulNBits reads MatMul weights only
            method = "gptq" if calibration else "mse"
            found.append(Family("block-wise weights", tuple(f"weight-only{{bits={b} method={method}}}" for b in WEIGHT_BITS)))
        if convs or matmuls:
            # between 8 and 4 bits, with calibration data: each tensor 4 or 8 bits by its sensitivity, 6 on average
            mixed = ("cluster{bits=6 allocate=sensitivity}",) if calibration else ()
            found.append(Family("codebook", (f"cluster{{bits={CODEBOOK_BITS[0]}}}", *mixed, f"cluster{{bits={CODEBOOK_BITS[1]}}}")))
            if calibration:  # each tensor in its own format (float16, 8- or 4-bit codebook, 4-bit blocks), chosen against the budget
                found.append(Family(MIXED, ("mixed-precision",)))
            criterion = " criterion=wanda" if calibration else ""
            found.append(Family("sparse", tuple(f"magnitude-prune{{sparsity={s}{criterion}}},{ENCODE}" for s in SPARSITIES)))
    return found


def combinations(held: dict[str, str], objective: Objective) -> list[Candidate]:
    """Pipelines made of the strongest rung each family held: channels removed, then int8 (the
    pairing the README's table found best on convolutional models); for ``size``, channels removed
    and then each remaining tensor in its own format, and the weights pruned, then as codebooks (or
    each in its own format), then encoded: a pruned weight's codebook index takes one bit as a mask
    (ResNet-18: 0.095x at the accuracy of 16 centroids alone, 0.126x)."""
    found: list[Candidate] = []
    channels = held.get("channels")
    for int8 in ("int8 static", "int8 dynamic"):
        if channels is not None and int8 in held:
            quantize = held[int8].replace(f" {SENSITIVITY}", "")  # scanned once, on the int8 candidate alone
            found.append(Candidate(f"{channels},{quantize}", f"channels + {int8}", parts=("channels", int8)))
    if objective != "size":
        return found
    if channels is not None and MIXED in held:
        found.append(Candidate(f"{channels},{held[MIXED]}", f"channels + {MIXED}", parts=("channels", MIXED)))
    pruned = held.get("sparse", "").removesuffix(f",{ENCODE}")
    for formats in ("codebook", MIXED):
        if pruned and formats in held:
            found.append(Candidate(f"{pruned},{held[formats]},{ENCODE}", f"sparse + {formats}", parts=("sparse", formats)))
    return found


def _constant_data(model: onnx.ModelProto) -> set[str]:
    """The op types of main-graph nodes whose first input is constant (a Gather's embedding table)."""
    constants = {t.name for t in model.graph.initializer}
    return {node.op_type for node in model.graph.node if node.input and node.input[0] in constants}


def _constant_inputs(model: onnx.ModelProto) -> set[str]:
    """The op types of main-graph nodes that read an initializer or a Constant node's output."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return {node.op_type for node in model.graph.node if any(name in constants for name in node.input[1:])}
