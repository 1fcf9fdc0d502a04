"""The benchmark's rows: every configuration in one list, so adding one is one line.

A configuration is a name (the row label and, slugged, its results folder), a pipeline text and the
tool that runs it:

* ``fp32``        the cached model itself: the reference every other row is compared with;
* ``onnxsparse``  an onnxsparse pipeline, run with ``onnxsparse optimize ... --policy keep`` so the row
                  shows what the passes do even past their tolerance;
* ``ort``         onnxruntime's quantizer (``onnxruntime.quantization``), run in the peers venv;
* ``onnxsim``     onnxsim's Python API, run in the peers venv.

Peer pipelines are calls separated by ``;``, written as Python calls with literal keyword arguments,
e.g. ``simplify(); apply_structured_pruning(sparsity=0.3)`` (see ``benchmark.peer``). A function that
takes calibration data gets the task's calibration feeds; the rows say nothing else implicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FP32 = "fp32"
ONNXSPARSE = "onnxsparse"
ORT = "ort"
ONNXSIM = "onnxsim"
TOOLS = (FP32, ONNXSPARSE, ORT, ONNXSIM)
PEER_TOOLS = (ORT, ONNXSIM)


@dataclass(frozen=True)
class Config:
    name: str
    pipeline: str
    tool: str = ONNXSPARSE

    @property
    def slug(self) -> str:
        """A folder name: 'magnitude 50% wanda' -> 'magnitude-50pct-wanda'."""
        text = self.name.replace("%", "pct").replace("+", "plus").replace(":", "of")
        return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-").lower()


# Every pruning row folds BatchNorm first: pruning an unfolded Conv would be undone in spirit by the
# BN scale, and the peers' rows do the same with onnxsim's simplify (which fuses BN too).
_PRUNE = "fold-batchnorm,magnitude-prune"
# ort rows name every setting, defaults included, so the table says exactly what was asked for.
_ORT_STATIC = 'quantize_static(quant_format="QDQ", per_channel=True, activation_type="QUInt8", weight_type="QInt8", calibrate_method="MinMax")'


def _ort_nbits(algorithm: str, is_symmetric: bool = True, gather: bool = False) -> str:
    """A MatMulNBitsQuantizer row: our block (32) and bits (4) named, not the quantizer's defaults (128, asymmetric);
    ``gather``: embedding tables too (GatherBlockQuantized), as weight-only does by default."""
    op_types = '("MatMul", "Gather")' if gather else '("MatMul",)'
    return f'matmul_nbits(algorithm="{algorithm}", block_size=32, is_symmetric={is_symmetric}, accuracy_level=None, bits=4, op_types={op_types})'


# The unstructured grid the magnitude-prune issue asks for: each criterion and scope at 30, 50 and 70%
# (Wanda's own comparison group is the row; "wanda per-tensor" is the row-free variant), and the
# sparse-encoded file at each sparsity (the bytes depend on how many weights are zero, not on which).
_GRID_ROWS: tuple[tuple[str, str], ...] = (
    ("", ""),
    (" per-row", " scope=per-row"),
    (" global", " scope=global"),
    (" sensitivity", " scope=sensitivity"),
    (" wanda", " criterion=wanda scope=per-row"),
    (" wanda per-tensor", " criterion=wanda"),
    (" sparsegpt", " criterion=sparsegpt"),
    (" sparsegpt sensitivity", " criterion=sparsegpt scope=sensitivity"),
)


def _magnitude_grid() -> tuple[Config, ...]:
    rows = []
    for percent in (30, 50, 70):
        rows.extend(Config(f"magnitude {percent}%{suffix}", f"{_PRUNE}{{sparsity={percent / 100:g}{options}}}") for suffix, options in _GRID_ROWS)
        rows.append(Config(f"magnitude {percent}% + sparse-encode", f"{_PRUNE}{{sparsity={percent / 100:g}}},sparse-encode"))
        # bit masks: ~0.53x of a half-zero float32 tensor where coo keeps ~0.9x (onnxruntime folds them at load)
        rows.append(Config(f"magnitude {percent}% + sparse-encode mask", f"{_PRUNE}{{sparsity={percent / 100:g}}},sparse-encode{{format=mask}}"))
    return tuple(rows)


CONFIGS: tuple[Config, ...] = (
    Config("fp32", "", FP32),
    Config("cleanup", "cleanup"),
    *_magnitude_grid(),
    Config("magnitude 90%", f"{_PRUNE}{{sparsity=0.9}}"),
    Config("2:4 sparsegpt", f"{_PRUNE}{{pattern=2:4 criterion=sparsegpt}}"),
    Config("channel 30%", "fold-batchnorm,channel-prune{ratio=0.3}"),
    Config("channel 50%", "fold-batchnorm,channel-prune{ratio=0.5}"),
    Config("channel 30% round 8", "fold-batchnorm,channel-prune{ratio=0.3 round_to=8}"),
    Config("channel 30% sensitivity refit", "fold-batchnorm,channel-prune{ratio=0.3 scope=sensitivity refit=true}"),
    Config("channel 50% sensitivity refit", "fold-batchnorm,channel-prune{ratio=0.5 scope=sensitivity refit=true}"),
    Config("channel 20% sensitivity refit downstream",
           "fold-batchnorm,channel-prune{ratio=0.2 scope=sensitivity refit=true refit_scope=downstream}"),
    Config("channel 30% refit downstream", "fold-batchnorm,channel-prune{ratio=0.3 refit=true refit_scope=downstream}"),
    Config("channel 50% refit downstream", "fold-batchnorm,channel-prune{ratio=0.5 refit=true refit_scope=downstream}"),
    Config("channel 50% sensitivity refit downstream",
           "fold-batchnorm,channel-prune{ratio=0.5 scope=sensitivity refit=true refit_scope=downstream}"),
    # criterion=output: channels ranked by the energy they send through their consumers' weights
    Config("channel 30% output refit downstream", "fold-batchnorm,channel-prune{ratio=0.3 criterion=output refit=true refit_scope=downstream}"),
    Config("channel 50% output refit downstream", "fold-batchnorm,channel-prune{ratio=0.5 criterion=output refit=true refit_scope=downstream}"),
    Config("channel 20% output sensitivity refit downstream",
           "fold-batchnorm,channel-prune{ratio=0.2 criterion=output scope=sensitivity refit=true refit_scope=downstream}"),
    # budget=macs: the ratio is of multiply-accumulates saved, spent where the drift per MAC is lowest
    *(Config(f"channel {p}% of MACs output sensitivity refit downstream",
             f"fold-batchnorm,channel-prune{{ratio={p / 100:g} budget=macs criterion=output scope=sensitivity refit=true refit_scope=downstream}}")
      for p in (30, 50)),
    # budget=latency: the ratio is of onnxruntime time saved, each group's probe timed and smoothed by a fit on MACs and activations
    *(Config(f"channel {p}% of latency output sensitivity refit downstream",
             f"fold-batchnorm,channel-prune{{ratio={p / 100:g} budget=latency criterion=output scope=sensitivity refit=true refit_scope=downstream}}")
      for p in (30, 50)),
    # criterion=reconstruction: channels ranked by what losing them costs once the others compensate (what the refit then does)
    Config("channel 30% reconstruction refit downstream",
           "fold-batchnorm,channel-prune{ratio=0.3 criterion=reconstruction refit=true refit_scope=downstream}"),
    Config("channel 50% reconstruction refit downstream",
           "fold-batchnorm,channel-prune{ratio=0.5 criterion=reconstruction refit=true refit_scope=downstream}"),
    *(Config(f"channel {p}% of latency reconstruction sensitivity refit downstream",
             f"fold-batchnorm,channel-prune{{ratio={p / 100:g} budget=latency criterion=reconstruction scope=sensitivity refit=true refit_scope=downstream}}")
      for p in (30, 40, 50, 70)),
    Config("int8", "qdq"),
    Config("channel 30% + int8", "fold-batchnorm,channel-prune{ratio=0.3},qdq"),
    Config("magnitude 90% + sparse-encode", f"{_PRUNE}{{sparsity=0.9}},sparse-encode"),
    Config("channel 30% + int8 + sparse-encode",
           "fold-batchnorm,channel-prune{ratio=0.3 scope=sensitivity refit=true},qdq,sparse-encode"),
    Config("channel 30% of MACs output sensitivity refit downstream + int8",
           "fold-batchnorm,channel-prune{ratio=0.3 budget=macs criterion=output scope=sensitivity refit=true refit_scope=downstream},qdq"),
    # int8 runs MobileNetV2 in 0.61x on AVX2 (7-bit weights): channels only need to take the rest of the way
    *(Config(f"channel {p}% of latency reconstruction sensitivity refit downstream + int8",
             f"fold-batchnorm,channel-prune{{ratio={p / 100:g} budget=latency criterion=reconstruction scope=sensitivity refit=true refit_scope=downstream}},qdq")
      for p in (20, 30, 40, 50)),
    Config("int8 + int8 embeddings", "qdq{embeddings=true}"),
    # Distillation rows (need torch: the train extra): trained toward the fp32 model on the task's training
    # split where it has one (the digit models' train.npz), else on its calibration split, varied.
    Config("channel 70% + distill", 'fold-batchnorm,channel-prune{ratio=0.7},distill{epochs=30 data="$TASK/train.npz" calibration_samples=4000}'),
    Config("channel 50% refit downstream + distill augmented",
           "fold-batchnorm,channel-prune{ratio=0.5 refit=true refit_scope=downstream},distill{epochs=30 augment=flip,crop,mixup}"),
    Config("int8 + distill qat", "qdq,distill{epochs=10 learning_rate=0.0001}"),
    Config("ort quantize_static", _ORT_STATIC, ORT),
    Config("ort quantize_dynamic", 'quantize_dynamic(weight_type="QInt8")', ORT),
    # 4-bit block-wise weight-only MatMul weights (MatMulNBits), block 32, against onnxruntime's MatMulNBitsQuantizer
    Config("int4 weight-only", "weight-only"),
    Config("int4 weight-only mse", "weight-only{method=mse}"),
    Config("int4 weight-only gptq", "weight-only{method=gptq}"),
    Config("int4 weight-only gptq asym", "weight-only{method=gptq symmetric=false}"),
    Config("int4 weight-only matmul only", "weight-only{embeddings=false}"),
    Config("int4 weight-only gptq matmul only", "weight-only{method=gptq embeddings=false}"),
    Config("int4 weight-only asym", "weight-only{symmetric=false}"),
    Config("int4 weight-only acc4", "weight-only{accuracy_level=4}"),
    # k-means codebooks (16 centroids), decoded at load: the file's size at a given accuracy
    Config("cluster 16", "cluster"),
    Config("cluster 16 gptq", "cluster{method=gptq}"),
    # pruned, then clustered: a pruned weight's index is its book's 0, one bit as a mask (ResNet-18: 0.095x, accuracy 0.957)
    Config("sparsegpt 50% + cluster 16 + sparse-encode mask", f"{_PRUNE}{{sparsity=0.5 criterion=sparsegpt}},cluster,sparse-encode{{format=auto}}"),
    Config("cluster 16 per channel gptq", "cluster{method=gptq scope=channel}"),
    Config("cluster 256 gptq", "cluster{method=gptq bits=8}"),
    Config("ort matmulnbits default sym", _ort_nbits("DEFAULT"), ORT),
    Config("ort matmulnbits default asym", _ort_nbits("DEFAULT", is_symmetric=False), ORT),
    Config("ort matmulnbits hqq", _ort_nbits("HQQ", is_symmetric=False), ORT),  # HQQ is asymmetric whatever it is told
    Config("ort matmulnbits rtn", _ort_nbits("RTN"), ORT),
    Config("ort matmulnbits k_quant", _ort_nbits("k_quant"), ORT),
    Config("ort matmulnbits gptq", _ort_nbits("GPTQ"), ORT),
    Config("ort matmulnbits default sym + gather", _ort_nbits("DEFAULT", gather=True), ORT),
    Config("ort matmulnbits default asym + gather", _ort_nbits("DEFAULT", is_symmetric=False, gather=True), ORT),
    Config("ort matmulnbits hqq + gather", _ort_nbits("HQQ", is_symmetric=False, gather=True), ORT),
    Config("onnxsim simplify", "simplify()", ONNXSIM),
    *(Config(f"onnxsim magnitude {p}%", f"simplify(); apply_magnitude_pruning(sparsity={p / 100:g})", ONNXSIM) for p in (30, 50, 70, 90)),
    *(Config(f"onnxsim wanda {p}%", f"simplify(); apply_wanda_pruning(sparsity={p / 100:g})", ONNXSIM) for p in (30, 50, 70)),
    *(Config(f"onnxsim sparsegpt {p}%", f"simplify(); apply_sparsegpt_pruning(sparsity={p / 100:g})", ONNXSIM) for p in (30, 50, 70)),
    Config("onnxsim 2:4 sparsegpt", "simplify(); apply_sparsegpt_pruning(n=2, m=4)", ONNXSIM),
    Config("onnxsim structured 30%", "simplify(); apply_structured_pruning(sparsity=0.3)", ONNXSIM),
    Config("onnxsim structured 50%", "simplify(); apply_structured_pruning(sparsity=0.5)", ONNXSIM),
    # Without simplify() first, onnxsim 0.8.1's quantize_static/quantize_dynamic return the torch
    # exports here unchanged (no error): measured, see the benchmark's notes.
    Config("onnxsim quantize_static", 'simplify(); quantize_static(method="minmax", per_channel=True)', ONNXSIM),
    Config("onnxsim quantize_dynamic", "simplify(); quantize_dynamic()", ONNXSIM),
)

# The task metrics shown in the table, per model (result.json keeps all of them). Keys come from
# realmodels.tasks' evaluators; "higher" says which direction is better, for the reader's legend.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "mobilenetv2": ("top1_agreement", "logit_cosine", "accuracy"),
    "ppocr_rec": ("exact_match", "cer"),
    "minilm": ("embedding_cosine", "embedding_cosine_min", "nn_agreement"),
    "mpnet": ("embedding_cosine", "embedding_cosine_min", "nn_agreement"),
    "mnist": ("accuracy", "top1_agreement"),
    "resnet18": ("accuracy", "top1_agreement"),
    "dwstack": ("accuracy", "top1_agreement"),
    "conv1d_seq": ("accuracy", "top1_agreement"),
    "bytecnn": ("accuracy", "top1_agreement"),
    "detector": ("map50", "detections_kept"),
}


def find_config(name: str) -> Config:
    for config in CONFIGS:
        if config.name == name or config.slug == name:
            return config
    raise KeyError(f"unknown configuration {name!r}; known: {', '.join(c.name for c in CONFIGS)}")


def _check_unique() -> None:
    # Two rows with one slug would share a results folder and overwrite each other's cache.
    slugs = [config.slug for config in CONFIGS]
    duplicates = sorted({slug for slug in slugs if slugs.count(slug) > 1})
    if duplicates:
        raise ValueError(f"configurations share a results folder: {', '.join(duplicates)}")


_check_unique()
