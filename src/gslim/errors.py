"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a checkpoint of the wrong
architecture) raises :class:`GslimError`. The CLI prints its message as one line on
stderr and exits non-zero; everything else is a bug and keeps its traceback.
"""


class GslimError(Exception):
    """An error caused by input, configuration or environment, with a one-line message."""

    exit_code = 2


class MissingDependencyError(GslimError):
    """An optional runtime (TensorRT, CUDA, onnxruntime-gpu) was asked for but is not installed."""

    exit_code = 3
