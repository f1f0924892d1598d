"""The ``gslim`` command line: thin Typer commands, one per pipeline stage.

Each command parses options, calls one stage function and prints a summary. User
mistakes raise :class:`gslim.errors.GslimError` and end here as one line on stderr and a
non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
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
    try:
        rc = command.main(args=argv, prog_name="gslim", standalone_mode=False)
    except GslimError as exc:
        if _STATE["debug"]:
            raise
        typer.echo(f"gslim: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("gslim: interrupted (finished artifacts are intact; rerun to resume)", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
