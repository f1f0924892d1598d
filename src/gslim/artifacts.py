"""Atomic artifact I/O.

Every file a stage writes goes to a temporary file in the same directory first and is
then renamed over the destination, so an interrupted run (Ctrl-C, kill, disk full)
never leaves a file that looks complete and never destroys the previous version.
Checkpoints are always loaded with ``weights_only=True``: a checkpoint that would need
to unpickle code is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from gslim.errors import GslimError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GslimError(f"cannot create directory {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise GslimError(f"output directory {parent} is not writable")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GslimError(f"could not write {dest}: {exc.strerror or exc} (previous file left intact)") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
        with open(tmp, "rb+") as fh:  # make the content durable before the rename
            os.fsync(fh.fileno())
    return Path(path)


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")

    return atomic_write(path, _write)


def append_jsonl(obj: Any, path: str | os.PathLike) -> None:
    """Append one JSON line. Lines are small and flushed, so a crash loses at most the last line."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as fh:
        fh.write(json.dumps(obj, default=_json_default) + "\n")
        fh.flush()


def load_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise GslimError(f"file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise GslimError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Load a checkpoint safely (``weights_only=True``) with one-line errors for every failure."""
    import torch

    p = Path(path)
    if not p.exists():
        raise GslimError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise GslimError(f"checkpoint path is not a file: {p}")
    if p.stat().st_size == 0:
        raise GslimError(f"checkpoint {p} is empty (an interrupted write?)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise GslimError(
                f"refusing to load {p}: it needs to unpickle code, and gslim loads checkpoints with "
                "weights_only=True (save a state_dict instead)"
            ) from exc
        raise GslimError(f"checkpoint {p} is corrupt: {msg}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GslimError(f"checkpoint {p} is truncated or corrupt: {first}") from exc


def refuse_overwrite(path: str | os.PathLike, force: bool, what: str = "result") -> None:
    """Refuse to overwrite a finished artifact unless ``force`` is set."""
    p = Path(path)
    if p.exists() and not force:
        raise GslimError(f"{p} already holds a finished {what}; pass --force to overwrite it")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
