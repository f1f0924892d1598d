"""The ``gslim`` command line: thin Typer commands, one per pipeline stage.

Each command parses options, calls one stage function and prints a summary. User
mistakes raise :class:`gslim.errors.GslimError` and end here as one line on stderr and a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import typer

from gslim import __version__
from gslim.errors import GslimError

app = typer.Typer(
    name="gslim",
    help="Greedy channel selection, physical slimming, fine-tuning, ONNX/TensorRT export and latency "
    "profiling for torchvision CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_STATE = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gslim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _STATE["debug"] = debug or bool(os.environ.get("GSLIM_DEBUG"))
    # GSLIM_HOST_MEMORY=keep: large freed tensors stay in the process instead of being faulted
    # in and zeroed by the kernel on every pass (gslim.host_memory: faster, more memory)
    from gslim.host_memory import apply_from_environment

    apply_from_environment()


def _register() -> None:
    # Imported here so each stage module stays independent; they import torch lazily.
    from gslim.commands import compress as compress_cmds
    from gslim.commands import export as export_cmds
    from gslim.commands import profile as profile_cmds
    from gslim.commands import run as run_cmds
    from gslim.commands import train as train_cmds

    for module in (train_cmds, compress_cmds, export_cmds, profile_cmds, run_cmds):
        module.register(app)


_register()


def main(argv: Optional[list[str]] = None) -> None:
    try:  # typer >= 0.26 vendors click; older releases depend on it
        from typer import _click as click
    except ImportError:  # pragma: no cover
        import click

    command = typer.main.get_command(app)
    terminated = {"signal": None}
    previous = _on_sigterm(terminated)
    try:
        rc = command.main(args=argv, prog_name="gslim", standalone_mode=False)
        if rc == 130:  # typer turns KeyboardInterrupt into a returned exit code 130
            raise KeyboardInterrupt
    except GslimError as exc:
        if _STATE["debug"]:
            raise
        typer.echo(f"gslim: error: {one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("gslim: interrupted (finished artifacts are intact; rerun to resume)", err=True)
        sys.exit(143 if terminated["signal"] is not None else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(rc if isinstance(rc, int) else 0)


def one_line(exc: BaseException) -> str:
    """An error message as one line.

    A GslimError raised in a DataLoader worker process comes back re-raised with the worker's
    whole traceback as its message; the original message is that traceback's last line.
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if (
        len(lines) > 1
        and lines[0].startswith("Caught ")
        and any(ln.startswith("Original Traceback") for ln in lines)
    ):
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        last = lines[-1]
        return last[len(prefix) :] if last.startswith(prefix) else last
    return " ".join(lines)


def _on_sigterm(flag: dict):
    """Treat SIGTERM (``docker stop``, a batch scheduler) like Ctrl-C: unwind, clean up, exit 143.

    Returns the previous handler, or None when none was installed (not the main thread, or
    someone else already handles SIGTERM).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def _handler(signum, frame):  # noqa: ARG001
        flag["signal"] = signum
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _handler)
