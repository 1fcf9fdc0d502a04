"""Train and export the small, real test models bundled in ``models/``.

Every model is trained on scikit-learn's bundled ``load_digits()`` data set
(1797 real 8x8 handwritten digits, pixel values 0..16), so no network access is
needed.  The split is ``train_test_split(test_size=0.2, random_state=0)``
(1437 train / 360 test), seeds are fixed and torch runs single-threaded with
deterministic algorithms, so re-running the script reproduces the same weights.

Produces (in ``--out``):

* ``digits_cnn.onnx``            PyTorch CNN that keeps its BatchNormalization nodes
* ``digits_transformer.onnx``    PyTorch one-block pre-norm transformer
* ``digits_sklearn_mlp.onnx``    scikit-learn StandardScaler+MLPClassifier pipeline
* ``<model>.inputs.npz``         the first 32 held-out test digits, scaled the way
                                 that model expects (key ``input``; key ``label``
                                 holds the true digits as int64)
* ``<model>.calibration.npz``    the first 64 TRAINING digits (disjoint from the test
                                 split), for passes that calibrate on data
* ``README.md``                  provenance: versions, opsets, accuracy, sha256

Needs (versions used to produce the committed files)::

    pip install torch==2.13.0 scikit-learn==1.9.1 skl2onnx==1.20.0 \
        onnx==1.23.2 onnxruntime==1.31.1 numpy==2.4.6

(only ``torch==2.13.0`` may be asked for by that exact spec: it is the CPU
build on disk; anything looser pulls CUDA wheels.)

Usage::

    python tools/export_models.py --out models/
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
import torch
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

SEED = 0
OPSET = 17
# onnxruntime 1.31 loads IR <= 13 and onnx 1.23 would stamp IR 14 on a freshly
# built model; opset 17 belongs to IR 8, so never write anything newer than that.
MAX_IR_VERSION = 8
N_SAMPLE_INPUTS = 32
N_CALIBRATION = 64  # training digits for calibration (wanda, sparsegpt, int8 ranges)
REGEN_COMMAND = "python tools/export_models.py --out models/"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsSplit:
    """Raw pixel values (0..16, float32) of the fixed 80/20 digits split."""

    x_train: np.ndarray  # [1437, 64]
    y_train: np.ndarray  # [1437] int64
    x_test: np.ndarray  # [360, 64]
    y_test: np.ndarray  # [360] int64


def load_split() -> DigitsSplit:
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    # Shuffled with a fixed seed so every model sees exactly the same test digits.
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=SEED, shuffle=True
    )
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


def to_image(x_raw: np.ndarray) -> np.ndarray:
    """[N, 64] raw pixels -> [N, 1, 8, 8] in [0, 1] (the CNN's input)."""
    return (x_raw / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)


def to_tokens(x_raw: np.ndarray) -> np.ndarray:
    """[N, 64] raw pixels -> [N, 8 rows, 8 features] in [0, 1] (the transformer's input)."""
    return (x_raw / 16.0).reshape(-1, 8, 8).astype(np.float32)


def to_flat(x_raw: np.ndarray) -> np.ndarray:
    """[N, 64] raw pixels 0..16; the sklearn pipeline does its own standardizing."""
    return x_raw.astype(np.float32)


# ------------------------------------------------------------------------- models


class ConvBnRelu(nn.Sequential):
    def __init__(
        self, c_in: int, c_out: int, k: int, groups: int = 1, bias: bool = False
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=bias),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity, then relu (a ResNet basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + x)


class DigitsCNN(nn.Module):
    def __init__(self, c: int = 16, c_wide: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        # The stem conv keeps its bias and the others don't, so a BN-folding pass
        # meets both the "Conv already has B" and the "Conv has no B" cases.
        self.stem = ConvBnRelu(1, c, 3, bias=True)
        self.block = ResidualBlock(c)
        self.depthwise = ConvBnRelu(c, c, 3, groups=c)
        self.pointwise = ConvBnRelu(c, c_wide, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)  # exported as GlobalAveragePool
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_wide, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.block(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out so it exports as plain MatMul/Softmax."""

    def __init__(self, d: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.d_head, self.tokens, self.d = heads, d // heads, tokens, d
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.scale = self.d_head**-0.5

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # -1 for the batch keeps the Reshape target a constant under a dynamic batch.
        x = x.reshape(-1, self.tokens, self.heads, self.d_head)
        return x.transpose(1, 2)  # [B, H, T, Dh]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.d)
        return self.out(y)


class DigitsTransformer(nn.Module):
    """8 image rows as 8 tokens of 8 features; one pre-norm encoder block."""

    def __init__(
        self, tokens: int = 8, feat: int = 8, d: int = 32, heads: int = 2,
        d_mlp: int = 64, n_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(feat, d)
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, tokens)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, d_mlp), nn.GELU(approximate="none"), nn.Linear(d_mlp, d)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h).mean(dim=1))


# ----------------------------------------------------------------------- training


def seed_everything() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    # One thread + deterministic kernels: otherwise float reductions can differ
    # run to run and the exported weights (and their sha256) would drift.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def train_torch(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
    batch_size: int = 64,
) -> nn.Module:
    seed_everything()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def build_cnn(split: DigitsSplit) -> nn.Module:
    seed_everything()  # seeds the weight init too
    return train_torch(DigitsCNN(), to_image(split.x_train), split.y_train, epochs=30, lr=3e-3)


def build_transformer(split: DigitsSplit) -> nn.Module:
    seed_everything()
    return train_torch(
        DigitsTransformer(), to_tokens(split.x_train), split.y_train, epochs=60, lr=3e-3
    )


def build_sklearn_mlp(split: DigitsSplit) -> Pipeline:
    clf = MLPClassifier(hidden_layer_sizes=(64, 32), random_state=SEED, max_iter=1000)
    pipe = Pipeline([("scaler", StandardScaler()), ("mlp", clf)])
    return pipe.fit(to_flat(split.x_train), split.y_train)


# ------------------------------------------------------------------------ export


def export_torch(
    model: nn.Module, sample: np.ndarray, path: Path, keep_batchnorm: bool
) -> onnx.ModelProto:
    """TorchScript export (dynamo=False) with a dynamic batch dim named ``batch``.

    With ``keep_batchnorm``: TrainingMode.PRESERVE on a model in eval() mode
    skips the eval-mode peephole pass that fuses Conv+BatchNorm, and
    do_constant_folding=False keeps it from folding them another way, so the
    BatchNormalization nodes survive (inference form, 1 output) for our
    fold-batchnorm pass to find.  Without it, the ordinary EVAL export with
    constant folding is used, so Linear weights are stored pre-transposed
    instead of behind a Transpose node each.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(
            model,
            (torch.from_numpy(sample),),
            str(path),
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            training=(
                torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
            ),
            do_constant_folding=not keep_batchnorm,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return onnx.load(str(path))


def exporter_note(keep_batchnorm: bool) -> str:
    flags = (
        "training=TrainingMode.PRESERVE, do_constant_folding=False"
        if keep_batchnorm
        else "training=TrainingMode.EVAL, do_constant_folding=True"
    )
    return (
        f"torch.onnx.export (TorchScript exporter, dynamo=False, {flags}, "
        f"opset_version={OPSET}) from torch {torch.__version__}"
    )


def export_sklearn(pipe: Pipeline) -> onnx.ModelProto:
    clf = pipe.named_steps["mlp"]
    return convert_sklearn(
        pipe,
        name="digits_sklearn_mlp",
        initial_types=[("input", FloatTensorType([None, 64]))],
        target_opset={"": OPSET, "ai.onnx.ml": 3},
        # No ZipMap: plain tensors out (label int64 [N], probabilities float [N, 10]).
        options={id(clf): {"zipmap": False}},
    )


def finalize(model: onnx.ModelProto, path: Path, description: str) -> onnx.ModelProto:
    """Cap the IR version, stamp provenance, save with all weights inline, check."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    model.doc_string = description
    del model.metadata_props[:]
    for key, value in {
        "training_data": "sklearn.datasets.load_digits, train_test_split(test_size=0.2, random_state=0)",
        "regenerate": REGEN_COMMAND,
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(path), save_as_external_data=False)
    reloaded = onnx.load(str(path))
    onnx.checker.check_model(reloaded, full_check=True)
    return reloaded


# -------------------------------------------------------------------- evaluation


@dataclass
class Report:
    name: str
    path: Path
    model: onnx.ModelProto
    framework: str
    exporter: str
    architecture: str
    input_note: str
    accuracy: float
    max_abs_diff: float | None  # ORT vs. source framework on the test split
    extra: list[str] = field(default_factory=list)


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def save_inputs(out: Path, name: str, x_test: np.ndarray, y_test: np.ndarray, x_train: np.ndarray, y_train: np.ndarray) -> None:
    """Validation inputs from the test split; calibration inputs from the TRAIN split, so that a
    method tuned on its calibration data is never judged on the same digits."""
    np.savez(out / f"{name}.inputs.npz", input=x_test[:N_SAMPLE_INPUTS], label=y_test[:N_SAMPLE_INPUTS])
    np.savez(out / f"{name}.calibration.npz", input=x_train[:N_CALIBRATION], label=y_train[:N_CALIBRATION])


def run_torch_model(
    name: str, out: Path, split: DigitsSplit, build: Callable[[DigitsSplit], nn.Module],
    prep: Callable[[np.ndarray], np.ndarray], architecture: str, input_note: str,
    keep_batchnorm: bool,
) -> Report:
    model = build(split)
    x_test = prep(split.x_test)
    path = out / f"{name}.onnx"
    proto = export_torch(model, x_test[:2], path, keep_batchnorm)
    proto = finalize(proto, path, f"{name}: {architecture}")
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test)).numpy()
    (got,) = ort_outputs(path, x_test)
    save_inputs(out, name, x_test, split.y_test, prep(split.x_train), split.y_train)
    return Report(
        name, path, proto, f"PyTorch {torch.__version__}",
        exporter_note(keep_batchnorm),
        architecture, input_note,
        accuracy=float((got.argmax(1) == split.y_test).mean()),
        max_abs_diff=float(np.abs(ref - got).max()),
    )


def run_sklearn_model(out: Path, split: DigitsSplit) -> Report:
    name = "digits_sklearn_mlp"
    pipe = build_sklearn_mlp(split)
    x_test = to_flat(split.x_test)
    path = out / f"{name}.onnx"
    architecture = (
        "Pipeline(StandardScaler, MLPClassifier(hidden_layer_sizes=(64, 32), relu, "
        "adam, random_state=0, max_iter=1000)); ZipMap disabled"
    )
    proto = finalize(export_sklearn(pipe), path, f"{name}: {architecture}")
    label, proba = ort_outputs(path, x_test)
    save_inputs(out, name, x_test, split.y_test, to_flat(split.x_train), split.y_train)
    clf = pipe.named_steps["mlp"]
    return Report(
        name, path, proto, f"scikit-learn {sklearn.__version__}",
        f"skl2onnx {skl2onnx.__version__}", architecture,
        "`input` float32 [batch, 64]: raw pixel values 0..16 (the pipeline standardizes)",
        accuracy=float((label == split.y_test).mean()),
        max_abs_diff=float(np.abs(pipe.predict_proba(x_test) - proba).max()),
        extra=[
            f"MLP converged after {clf.n_iter_} iterations (final training loss {clf.loss_:.5f}).",
            (f"Labels agree with sklearn's predict() on {int((label == pipe.predict(x_test)).sum())}/"
            f"{len(x_test)} test digits."),
        ],
    )


# ------------------------------------------------------------------------ README


def shape_str(vi: onnx.ValueInfoProto) -> str:
    dims = vi.type.tensor_type.shape.dim
    elem = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    # A dim with neither a value nor a name is dynamic and unnamed (skl2onnx's batch).
    names = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in dims]
    return f"{elem} [" + ", ".join(names) + "]"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items()))


def describe(r: Report) -> str:
    data = r.path.read_bytes()
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in r.model.opset_import)
    ios = [f"input `{i.name}` {shape_str(i)}" for i in r.model.graph.input] + [
        f"output `{o.name}` {shape_str(o)}" for o in r.model.graph.output
    ]
    hist = ", ".join(f"{k} {v}" for k, v in op_histogram(r.model).items())
    lines = [
        f"## `{r.path.name}`",
        "",
        f"- Framework: {r.framework}",
        f"- Exporter: {r.exporter}; producer field `{r.model.producer_name} {r.model.producer_version}`",
        f"- Opsets: {opsets}; IR version {r.model.ir_version}",
        f"- Architecture: {r.architecture}",
        f"- Inputs/outputs: {'; '.join(ios)}",
        f"- Input scaling: {r.input_note}",
        f"- Nodes ({len(r.model.graph.node)}): {hist}",
        f"- Initializers: {len(r.model.graph.initializer)}, all stored inside the file",
        ("- Training data: `sklearn.datasets.load_digits()` (1797 real 8x8 handwritten digits), "
        "`train_test_split(test_size=0.2, random_state=0, shuffle=True)`: 1437 train / 360 test"),
        f"- Held-out accuracy (onnxruntime {ort.__version__}, all 360 test digits): {r.accuracy:.4f}",
    ]
    if r.max_abs_diff is not None:
        lines.append(f"- Max |source framework - onnxruntime| over the test split: {r.max_abs_diff:.2e}")
    lines += [f"- {e}" for e in r.extra]
    lines += [
        (f"- Sample inputs: `{r.path.stem}.inputs.npz` (first {N_SAMPLE_INPUTS} test digits; "
        "key `input`, plus `label` int64 with the true digits); calibration inputs: "
        f"`{r.path.stem}.calibration.npz` (first {N_CALIBRATION} training digits, disjoint from the test split)"),
        f"- File size: {len(data)} bytes",
        f"- sha256: `{hashlib.sha256(data).hexdigest()}`",
        f"- Regenerate: `{REGEN_COMMAND}`",
        "",
    ]
    return "\n".join(lines)


def write_readme(out: Path, reports: list[Report]) -> None:
    header = [
        "# Bundled test models",
        "",
        "Small real models trained on real data, used to test onnxsparse's passes.",
        "All are produced by `tools/export_models.py` (trained a few seconds on CPU,",
        "fixed seeds, single-threaded deterministic torch), so this file is regenerated with them.",
        "",
        (f"Environment: Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}."),
        "",
        (f"Regenerate all: `{REGEN_COMMAND}` (needs `pip install torch==2.13.0 "
        "scikit-learn==1.9.1 skl2onnx==1.20.0`)."),
        "",
        "The IR version is capped at 8 (what opset 17 belongs to) so older onnxruntime builds load them.",
        "`?` in a shape is a dynamic dim without a name (skl2onnx leaves the batch dim unnamed).",
        "",
        "",
    ]
    (out / "README.md").write_text("\n".join(header) + "\n".join(describe(r) for r in reports))


# -------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    split = load_split()
    reports = [
        run_torch_model(
            "digits_cnn", out, split, build_cnn, to_image,
            "Conv3x3(1->16, bias)+BN+ReLU stem; residual block (Conv3x3+BN+ReLU, "
            "Conv3x3+BN, +identity, ReLU); depthwise Conv3x3 (groups=16)+BN+ReLU; "
            "pointwise Conv1x1(16->32)+BN+ReLU; GlobalAveragePool; Flatten; Linear(32->10) "
            "as Gemm. Only the stem conv has a bias. BatchNormalization kept unfolded.",
            "`input` float32 [batch, 1, 8, 8]: pixel values / 16, i.e. in [0, 1]",
            keep_batchnorm=True,
        ),
        run_torch_model(
            "digits_transformer", out, split, build_transformer, to_tokens,
            "8 image rows as 8 tokens x 8 features; Linear(8->32) embedding + learned "
            "positional embedding; one pre-norm block: LayerNorm -> 2-head self-attention "
            "(explicit MatMul/Softmax, q/k/v/out Linear) -> residual Add; LayerNorm -> "
            "Linear(32->64) -> GELU (exact, erf) -> Linear(64->32) -> residual Add; final "
            "LayerNorm; mean over tokens; Linear(32->10).",
            "`input` float32 [batch, 8, 8]: pixel values / 16, i.e. in [0, 1]; rows are tokens",
            keep_batchnorm=False,
        ),
        run_sklearn_model(out, split),
    ]
    write_readme(out, reports)
    for r in reports:
        print(f"{r.path.name}: {r.path.stat().st_size} bytes, accuracy {r.accuracy:.4f}, "
              f"max diff {r.max_abs_diff:.2e}, ops {op_histogram(r.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
