"""Atomic artifact I/O.

Every file a stage writes goes to a temporary file in the same directory first and is
then renamed over the destination, so an interrupted run (Ctrl-C, kill, disk full)
never leaves a file that looks complete and never destroys the previous version.
Checkpoints are always loaded with ``weights_only=True``: a checkpoint that would need
to unpickle code is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from gslim.errors import GslimError, first_line


def writable_parent(dest: Path) -> Path:
    """Create ``dest``'s directory if needed and make sure this process may write there."""
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GslimError(f"cannot create directory {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise GslimError(f"output directory {parent} is not writable")
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    dest = Path(path)
    parent = writable_parent(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; artifacts get ordinary file permissions
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GslimError(
            f"could not write {dest}: {exc.strerror or exc} (previous file left intact)"
        ) from exc
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


def json_line(obj: Any) -> str:
    """``obj`` as one JSON line (no newline), as :func:`append_jsonl` writes it."""
    return json.dumps(obj, default=_json_default)


def append_jsonl(obj: Any, path: str | os.PathLike) -> None:
    """Append one JSON line. Lines are small and flushed, so a crash loses at most the last line."""
    p = Path(path)
    line = json_line(obj) + "\n"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as fh:
            fh.write(line)
            fh.flush()
    except OSError as exc:
        raise GslimError(f"could not append to {p}: {exc.strerror or exc}") from exc


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

    def _write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            # torch's C++ writer reports a failed write (a full disk, a vanished directory) as a
            # RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ..."), not an OSError.
            raise OSError(errno.EIO, "torch.save could not finish writing (is the disk full?)") from exc

    return atomic_write(path, _write)


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
        with warnings.catch_warnings():
            # random bytes can look like an exotic pickle protocol: torch warns before it fails
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(p, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if m:  # a real pickle that names a class or function: loading it would run code
            raise GslimError(
                f"refusing to load {p}: it needs to unpickle code ({m.group(1)}), and gslim loads checkpoints "
                "with weights_only=True (save a state_dict or a gslim checkpoint instead)"
            ) from exc
        raise GslimError(f"checkpoint {p} is truncated or corrupt: {_weights_only_reason(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file raises anything from EOFError to KeyError
        raise GslimError(f"checkpoint {p} is truncated or corrupt: {_first_sentence(exc)}") from exc


def refuse_overwrite(path: str | os.PathLike, force: bool, what: str = "result") -> None:
    """Refuse to overwrite a finished artifact unless ``force`` is set."""
    p = Path(path)
    if p.exists() and not force:
        raise GslimError(f"{p} already holds a finished {what}; pass --force to overwrite it")


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Fail early, before any work, when ``path`` cannot become a writable directory.

    Nothing is created: the nearest existing ancestor must be a directory this process may
    write to (a path under a regular file, or in a read-only directory, is refused).
    """
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == p else f"is under {probe}, which is"
        raise GslimError(f"{what} {p} {where} a file, not a directory")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise GslimError(f"{what} {p} is not writable (no write permission on {probe})")
    return p


class Transaction:
    """Several artifacts published together, or none of them.

    ``stage(final)`` gives a path with ``final``'s name in a private directory next to it (the
    same filesystem, so the last rename is atomic; side files written next to it, such as ONNX
    external data, keep valid relative references). ``commit()`` publishes everything in staging
    order: each artifact's side files first and the artifact itself last, each fsynced and
    renamed. Leaving the ``with`` block removes whatever was not published, so a failed or
    interrupted stage leaves no file that looks complete and the previous versions intact.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (private directory, final path)
        self._scratch: list[Path] = []

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, *exc: Any) -> None:
        for d in [d for d, _ in self._staged] + self._scratch:
            shutil.rmtree(d, ignore_errors=True)

    def stage(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        self._staged.append((_private_dir(final, ".tmp"), final))
        return self._staged[-1][0] / final.name

    def scratch(self, near: str | os.PathLike) -> Path:
        """A private working directory next to ``near``, removed at the end (never published)."""
        self._scratch.append(_private_dir(Path(near), ".scratch"))
        return self._scratch[-1]

    def commit(self) -> None:
        for stage_dir, final in self._staged:
            main = stage_dir / final.name
            try:
                for f in sorted(stage_dir.iterdir()):
                    if f != main:
                        _fsync(f)
                        os.replace(f, final.parent / f.name)
                _fsync(main)
                os.replace(main, final)
            except OSError as exc:
                raise GslimError(f"could not write {final}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def staged_file(dest: str | os.PathLike) -> Iterator[Path]:
    """One artifact (with any side files) through a :class:`Transaction`: write the yielded path;
    it is published when the block ends without an exception."""
    with Transaction() as tx:
        tmp = tx.stage(dest)
        yield tmp
        if not tmp.is_file():
            raise GslimError(f"nothing was written for {dest}")
        tx.commit()


def _private_dir(final: Path, suffix: str) -> Path:
    parent = writable_parent(final)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=parent))
    except OSError as exc:
        raise GslimError(f"cannot write to {parent}: {exc.strerror or exc}") from exc


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _weights_only_reason(exc: BaseException) -> str:
    """The unpickler's own complaint inside torch's long weights_only message."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    if m:
        return _first_sentence(Exception(m.group(1)))
    return _first_sentence(exc)


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


def _first_sentence(exc: BaseException) -> str:
    return first_line(exc, 200, sentence=True)
