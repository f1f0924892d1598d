"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a checkpoint of the wrong
architecture) raises :class:`GslimError`. The CLI prints its message as one line on
stderr and exits non-zero; everything else is a bug and keeps its traceback.
"""

import re


class GslimError(Exception):
    """An error caused by input, configuration or environment, with a one-line message."""

    exit_code = 2


class MissingDependencyError(GslimError):
    """An optional runtime (TensorRT, CUDA, onnxruntime-gpu) was asked for but is not installed."""

    exit_code = 3


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(
    exc: BaseException, limit: int = 300, *, sentence: bool = False, with_type: bool = False
) -> str:
    """An exception's first non-empty line, without colour codes, for a one-line message.

    ``sentence`` keeps only its first sentence (torch appends paragraphs of advice);
    ``with_type`` prefixes the exception's type (for errors that are not the user's). A
    KeyError's message is only the key, so it always gets its type.
    """
    text = _ANSI.sub("", str(exc)).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return type(exc).__name__
    if sentence:
        cut = line.find(". ")
        if 0 < cut < len(line) - 2:
            line = line[:cut]
    if with_type or isinstance(exc, KeyError):
        line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= limit else line[: limit - 1] + "…"
