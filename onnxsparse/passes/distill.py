"""``distill``: train the model toward the original's outputs (knowledge distillation), on PyTorch.

The student is the model as the pipeline has it (after pruning, say); the teacher is the run's
original model, whose outputs on the calibration samples onnxruntime computes once. The student's
float weights train in :mod:`onnxsparse.train` (torch, an optional extra) and are written back into
the same graph. A weight's exact zeros stay zero (pruned weights stay pruned). The calibration
samples are split: the held-out part picks the epoch kept and says whether training helped at all.

A QDQ model trains quantization-aware: its integer weights (behind DequantizeLinear) train as the
float values they stand for, rounded to their grid in every forward pass with gradients straight
through, and are written back as integers on the same grid (scales and zero points unchanged).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from ..calibration import RUN_SAMPLES, collect_feeds, held_out_runs, resolve_inputs, sample_axis
from ..errors import RequirementError
from ..limits import CALIBRATION_SAMPLES
from ..runtime import open_session, usable_cores
from ..train.augment import AUGMENTATIONS, applicable, augmented
from ..validation import Tolerance, class_score_outputs, run_feeds
from .base import Change, Pass, PassContext, PassResult, Requirement, Skip, register

log = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class Distill(Pass):
    """Train the float weights toward the original model's outputs on the calibration data: KL
    divergence at a temperature on class scores, mean squared error (relative to the original's
    energy) on other outputs; Adam, the epoch with the lowest held-out loss kept, exact zeros kept
    zero, integer weights trained on their quantization grid. Needs PyTorch: pip install 'onnxsparse[train]'.
    """

    name = "distill"
    requires = frozenset({Requirement.CALIBRATION})
    recovers = True
    default_tolerance = Tolerance(min_cosine=0.99)

    epochs: int = field(default=20, metadata={"help": "passes over the training samples, at most"})
    learning_rate: float = field(default=5e-4, metadata={"help": "Adam's step size"})
    batch_size: int = field(default=32, metadata={"help": "samples per step"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the KL divergence on class scores (x T^2)"})
    held_out: float = field(default=0.2, metadata={"help": "share of the calibration samples held out to choose the epoch"})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={
        "help": "the learning rate over the epochs: cosine decays it to 0 at the last epoch, constant keeps it"})
    patience: int = field(default=5, metadata={"help": "epochs without a better held-out loss before training stops"})
    data: str = field(default="", metadata={
        "help": "an .npz file (or folder of them) of training samples, inputs by name, taken instead of the calibration data: "
                "a training set is usually bigger than a calibration set"})
    calibration_samples: int = field(default=CALIBRATION_SAMPLES, metadata={"help": "samples read (the first ones) of the calibration data or data"})
    augment: tuple[str, ...] = field(default=(), metadata={
        "help": "ways to vary each training batch, the teacher run anew on what the student sees: flip (left-right), crop (a random "
                "60-100% of each side, resized back), jitter (brightness and contrast x0.8-1.2) for float [N, C, H, W] inputs; "
                "mixup (Beta(0.4, 0.4) mixes of two samples) when every input is float"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the batch order and the variations"})
    qat: bool = field(default=True, metadata={"help": "train integer weights behind DequantizeLinear on their grid (quantization-aware)"})

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.calibration_samples < 2:
            raise ValueError("epochs, batch_size and patience must be at least 1, calibration_samples at least 2")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out must be between 0 and 1, not {self.held_out}")
        if not (self.learning_rate > 0 and self.temperature > 0):
            raise ValueError("learning_rate and temperature must be above 0")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"augment: unknown {', '.join(unknown)}; known: {', '.join(AUGMENTATIONS)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, not {self.schedule!r}")
        if self.data and not Path(self.data).exists():
            raise ValueError(f"data: {self.data} does not exist")

    def needs(self) -> frozenset[Requirement]:
        return frozenset() if self.data else self.requires

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassResult:
        from ..train import require_torch

        torch = require_torch()
        from ..train.graph_module import GraphModule

        result = PassResult(model)
        source = resolve_inputs(self.data, model) if self.data else context.calibration
        if source is None or context.original is None:
            raise RequirementError("distill needs calibration data (or its data option) and the run's original model (the teacher)")
        if not sample_axis(model):
            result.skipped.append(Skip("model", "its inputs have no sample axis to draw training batches from"))
            return result
        inputs = _stacked(collect_feeds(source, model, limit=self.calibration_samples))
        samples = len(next(iter(inputs.values())))
        held = max(1, round(samples * self.held_out))
        if samples - held < 1:
            result.skipped.append(Skip("model", f"{samples} calibration sample(s): too few to train on and hold out from"))
            return result
        session = open_session(context.original, "distill teacher", runtime=context.runtime)
        teacher = _stacked(run_feeds(session, [{name: value[i:i + 64] for name, value in inputs.items()} for i in range(0, samples, 64)],
                                     "distill teacher"))
        data = _Samples(inputs, teacher, session, applicable(self.augment, inputs))
        result.skipped.extend(Skip("augment", f"{name}: no input of the model takes it (images: float [N, C, H, W]; mixup: float inputs only)")
                              for name in self.augment if name not in data.applied)
        student = GraphModule(model, quantized=self.qat)
        parameters = dict(student.onnx_parameters())
        if not parameters:
            why = "" if self.qat else "; an int8 model's integer weights train with qat=true"
            result.skipped.append(Skip("model", f"no weights to train{why}"))
            return result
        torch.manual_seed(self.seed)
        torch.set_num_threads(usable_cores())
        train, test = _split(samples, held, self.seed)
        started = time.perf_counter()
        fit = self._fit(torch, student, parameters, data, train, test, _Loss(torch, class_score_outputs(context.original), self.temperature, teacher),
                        context)
        result.figures.update(samples_trained=len(train), samples_held_out=len(test), augmented=list(data.applied),
                              held_out_loss_before=round(fit.before, 6), held_out_loss_after=round(fit.best, 6), epoch_kept=fit.best_epoch,
                              epochs_run=len(fit.history), training_seconds=round(time.perf_counter() - started, 1), history=fit.history)
        if fit.best_epoch == 0:
            result.skipped.append(Skip("model", f"training did not lower the held-out loss ({fit.before:.5g}); the weights are left as they were"))
            return result
        student.load_state_dict(fit.best_state)
        result.model = student.write_back()
        result.changes.append(Change("model", "distilled", {"parameters": len(parameters), "kept_zero": fit.kept_zero,
                                                            "held_out_loss": f"{fit.before:.5g} -> {fit.best:.5g}"}))
        return result

    def _fit(self, torch: Any, student: Any, parameters: dict[str, Any], data: _Samples, train: np.ndarray, test: np.ndarray,
             loss_of: _Loss, context: PassContext) -> _Fit:
        """Adam over ``train`` in batches, epoch by epoch, exact zeros put back after every step; the
        state of the epoch with the lowest held-out loss (epoch 0: the weights as they came)."""
        # held out as they are: the loss that picks the epoch is measured on samples, not variations
        test_batches = [data.batch(rows) for rows in _batches(test, self.batch_size)]
        masks = {name: (p.detach() != 0) for name, p in parameters.items() if bool((p.detach() == 0).any())}
        optimizer = torch.optim.Adam(parameters.values(), lr=self.learning_rate)
        steps = self.epochs * len(_batches(train, self.batch_size))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if self.schedule == "cosine" else None

        def held_out_loss() -> float:
            with torch.no_grad():
                return sum(float(loss_of(student, *batch)) * len(next(iter(batch[0].values()))) for batch in test_batches) / len(test)

        fit = _Fit(held_out_loss(), 0.0, copy.deepcopy(student.state_dict()), 0, [], len(masks))
        fit.best = fit.before
        for epoch in range(1, self.epochs + 1):
            rng = np.random.default_rng(self.seed + epoch)
            train_loss = 0.0
            for rows in _batches(rng.permutation(train), self.batch_size):
                optimizer.zero_grad()
                loss = loss_of(student, *data.batch(rows, rng))
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                with torch.no_grad():
                    for name, mask in masks.items():
                        parameters[name].mul_(mask)
                train_loss += float(loss.detach()) * len(rows)
            current = held_out_loss()
            fit.history.append({"epoch": epoch, "train_loss": round(train_loss / len(train), 6), "held_out_loss": round(current, 6)})
            log.info("distill epoch %d: train loss %.5f, held-out loss %.5f", epoch, train_loss / len(train), current)
            if context.progress:
                context.progress("distill", epoch, self.epochs)
            if current < fit.best:
                fit.best, fit.best_state, fit.best_epoch = current, copy.deepcopy(student.state_dict()), epoch
            elif epoch - fit.best_epoch >= self.patience:
                break
        return fit


@dataclass
class _Samples:
    """The training samples (inputs by name, samples on axis 0), the teacher's outputs on them, and
    the variations applied to training batches (run through the teacher's session anew)."""

    inputs: dict[str, np.ndarray]
    teacher: dict[str, np.ndarray]
    session: Any
    applied: tuple[str, ...]

    def batch(self, rows: np.ndarray, rng: np.random.Generator | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The inputs and teacher outputs of ``rows``, varied when ``rng`` is given and variations apply."""
        rows = np.sort(rows)
        inputs = {name: value[rows] for name, value in self.inputs.items()}
        if rng is None or not self.applied:
            return inputs, {name: value[rows] for name, value in self.teacher.items()}
        varied = augmented(inputs, self.applied, rng)
        return varied, dict(zip(self.teacher, self.session.run(list(self.teacher), varied)))


@dataclass
class _Fit:
    """What training did: the held-out loss before and at its best, that epoch's state, the per-epoch
    losses, and how many weights had zeros kept."""

    before: float
    best: float
    best_state: dict[str, Any]
    best_epoch: int
    history: list[dict[str, float]]
    kept_zero: int


def _split(samples: int, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sample indices, the held-out ones whole runs of RUN_SAMPLES neighbours
    (seeded), as the pipeline holds out validation samples: neighbours are often views or frames of one
    thing (MobileNetV2's calibration set: 8 views per photo), and a held-out view of a photo trained on
    says nothing about other photos. Single samples when there are too few runs to split."""
    runs = -(-samples // RUN_SAMPLES)
    chosen = max(1, round(runs * held / samples))
    if runs - chosen < 1:
        order = np.random.default_rng(seed).permutation(samples)
        return order[held:], order[:held]
    test = held_out_runs(samples, RUN_SAMPLES, chosen, seed)
    return np.setdiff1d(np.arange(samples), test), test


def _stacked(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feeds (samples on axis 0) as one array per name."""
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


def _batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[start:start + size] for start in range(0, len(indices), size)]


class _Loss:
    """The distillation loss of a batch: per output, KL(teacher || student) at temperature T (x T^2) on
    class scores over their last axis, else the squared error over the teacher's mean energy (over
    all the samples, so that batches weigh alike); summed."""

    def __init__(self, torch: Any, scores: frozenset[str], temperature: float, teacher: dict[str, np.ndarray]) -> None:
        self.torch, self.scores, self.temperature = torch, scores, temperature
        self.energy = {name: max(float(np.mean(np.square(value, dtype=np.float64))), 1e-12) for name, value in teacher.items()}

    def __call__(self, student: Any, inputs: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> Any:
        torch = self.torch
        outputs = student(**{name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in inputs.items()})
        total = 0.0
        for name, produced in outputs.items():
            target = torch.from_numpy(np.ascontiguousarray(targets[name]))
            if name in self.scores and produced.dim() >= 2:
                t = self.temperature
                log_p = torch.log_softmax(target / t, dim=-1)
                log_q = torch.log_softmax(produced / t, dim=-1)
                total = total + (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean() * t * t
            else:
                total = total + ((produced - target) ** 2).mean() / self.energy[name]
        return total
