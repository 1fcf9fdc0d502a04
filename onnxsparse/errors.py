"""One exception family: every error onnxsparse raises on purpose is an ``OnnxsparseError``.

The CLI maps them to exit status 2 (bad input) or 1 (a model failed validation) and prints the
message as one line, so each message must name the file or object at fault and the problem.
"""

from __future__ import annotations


class OnnxsparseError(Exception):
    """Base of every error raised on purpose by onnxsparse."""

    exit_code: int = 2


class ModelLoadError(OnnxsparseError):
    """The file is missing, is not ONNX, is truncated, or fails the onnx checker."""


class ExternalDataError(ModelLoadError):
    """External tensor data is missing, out of bounds, or points outside the model's folder."""


class OutputPathError(OnnxsparseError):
    """The output path equals the input, or cannot be written."""


class PipelineSpecError(OnnxsparseError):
    """Unknown pass, unknown or mistyped option, malformed pipeline text or recipe."""


class InputDataError(OnnxsparseError):
    """Validation or calibration inputs do not match the model (names, shapes, dtypes) or cannot be read."""


class RequirementError(OnnxsparseError):
    """A pass needs something the caller did not provide (calibration data, shapes...)."""


class UnsupportedModelError(OnnxsparseError):
    """The model uses something onnxsparse has no rule for (an op the training engine cannot run)."""


class RuntimeLoadError(OnnxsparseError):
    """onnxruntime refuses to load or run a model."""


class PassFailed(OnnxsparseError):
    """A pass raised or produced an invalid model, and the failure policy is ``raise``."""

    exit_code = 1


class ValidationFailed(OnnxsparseError):
    """Outputs moved beyond tolerance, and the failure policy is ``raise`` (or in ``validate``)."""

    exit_code = 1
