"""The `omopfl` command line: the root app, its entry points, and the one place errors become exit codes.

The commands live in modules named for who runs them; this module imports them (they never import it)
and registers them in the order ``omopfl --help`` lists them:

- :mod:`omopfl.cli_site`: the data engineer at a site (``sites ...``, ``cohort ...``, ``prepare``,
  ``validate``);
- :mod:`omopfl.cli_node`: the site's node (``train --site --superlink``, a Flower SuperNode);
- :mod:`omopfl.cli_coordinator`: the researcher or coordinator (``stats``, ``covariates``, ``server``,
  ``view``, ``train --simulate/--pooled``, ``evaluate --federated``);
- :mod:`omopfl.cli_train` and :mod:`omopfl.cli_evaluate`: the two commands that serve two audiences
  (declared once, routed by their options);
- :mod:`omopfl.cli_demo`: the newcomer on one machine (``synth``, ``eunomia``, ``demo``, ``examples``);
- :mod:`omopfl.cli_output`: what they share (console, ``--json`` output, table cells, common options).

An :class:`~omopfl.errors.OmopflError` becomes one line on stderr and the error's exit code
(:func:`main`).  Tracebacks never show local variables (they may hold patient data).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C before :func:`main` runs (while Python imports): nothing was started, one line, exit 130."""
    os.write(2, b"omopfl: error: interrupted\n")
    os._exit(130)


if __name__ == "__main__" or Path(sys.argv[0]).name == "omopfl":  # the command, not an import by tests
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import click  # noqa: E402
import typer  # noqa: E402

from omopfl import (  # noqa: E402
    __version__,
    cli_coordinator,
    cli_demo,
    cli_site,
)
from omopfl.cli_evaluate import evaluate  # noqa: E402
from omopfl.cli_output import console  # noqa: E402
from omopfl.cli_train import train  # noqa: E402
from omopfl.errors import OmopflError  # noqa: E402

__all__ = ["app", "main", "run"]

app = typer.Typer(
    name="omopfl",
    help="Federated learning across OMOP CDM sites: cohorts in the database, features, linked files, Flower.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def version() -> None:
    """Print omopfl's version."""
    console.print(__version__)


# ---------------------------------------------------------------- the commands, in the order --help lists them
app.command()(version)
app.command()(cli_demo.synth)
app.command()(cli_demo.eunomia)
app.command()(cli_site.prepare)
app.command()(cli_site.validate)
app.command()(cli_coordinator.stats)
app.command()(cli_coordinator.covariates)
app.command()(train)
app.command()(cli_coordinator.server)
app.command("view")(cli_coordinator.view_run)
app.command()(cli_demo.demo)
app.command()(cli_demo.examples)
app.command("evaluate")(evaluate)
app.add_typer(cli_site.sites_app, name="sites")
app.add_typer(cli_site.cohort_app, name="cohort")


# ---------------------------------------------------------------- entry point
EXIT_INTERRUPTED = 130
_INTERRUPTED_MESSAGE = "interrupted; a cohort build or prepare that did not finish changed nothing"
_interrupted: list[int] = []  # the signal number, once SIGINT arrived during a command


_RETRY_SECONDS = 0.02


def _importing(frame: Any) -> bool:
    """Is the interrupted code running inside an import (a module's top level, a native extension's init)?"""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt_when_safe(frame: Any) -> None:
    """Raise KeyboardInterrupt now, or, inside an import, a moment after it: an exception raised while a
    native extension (DuckDB's nanobind binding) initialises aborts the whole process (SIGABRT, no message
    of omopfl's).  SIGALRM re-checks every :data:`_RETRY_SECONDS` until the import is done."""
    if _importing(frame):
        signal.signal(signal.SIGALRM, lambda _signum, later: _interrupt_when_safe(later))
        signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)
        return
    raise KeyboardInterrupt


def _on_sigint(signum: int, frame: Any) -> None:
    """Note the interrupt, then raise KeyboardInterrupt as Python's default handler does (once no import is
    running, :func:`_interrupt_when_safe`).

    DuckDB turns the KeyboardInterrupt of a running query into ``RuntimeError: Query interrupted``;
    the note lets :func:`main` report an interrupt whatever exception it surfaces as.
    """
    if _interrupted:  # a second Ctrl-C while the first one unwinds (rollback, temp folder removal): let it finish
        return
    _interrupted.append(signum)
    _interrupt_when_safe(frame)


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"omopfl: error: {' '.join(str(message).split())}\n")
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map every outcome to one line and an exit code.

    Exit codes: 0 success, 1 unexpected internal error (reported by type only), 2 configuration,
    3 database, 4 CDM, 5 data, 6 fatal validation findings (``omopfl validate``), 7 federated run,
    130 interrupted (SIGINT).  Click's own usage errors keep click's exit code 2.
    Set ``OMOPFL_DEBUG=1`` to see the traceback of an unexpected error.
    """
    import threading

    _interrupted.clear()
    previous = previous_alarm = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
        previous_alarm = signal.getsignal(signal.SIGALRM)
    try:
        code = app(args=argv, standalone_mode=False)
    except OmopflError as exc:
        if _interrupted:
            _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
        _fail(exc.message, exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except SystemExit:
        raise
    except Exception as exc:  # the last line of defence: no traceback, no driver or exception text
        if _interrupted:
            _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
        if os.environ.get("OMOPFL_DEBUG"):
            raise
        if "sqlalchemy" in sys.modules:
            from omopfl.db import is_driver_error, map_driver_error

            if is_driver_error(exc):
                mapped = map_driver_error(exc)
                _fail(mapped.message, mapped.exit_code)
        _fail(f"internal error ({type(exc).__name__}); please report it with the command you ran "
              "(OMOPFL_DEBUG=1 shows the traceback)", 1)
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)  # a deferred interrupt still pending is reported below
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGALRM, previous_alarm)
    if _interrupted:
        _fail(_INTERRUPTED_MESSAGE, EXIT_INTERRUPTED)
    if isinstance(code, int) and code != 0:  # typer returns typer.Exit(code) with standalone_mode=False
        raise SystemExit(code)


def run() -> None:
    """The installed ``omopfl`` command: :func:`main`, then a quiet exit.

    DuckDB 2.0's Python binding prints pages of harmless "nanobind: leaked ..." lines at interpreter
    shutdown once Great Expectations has been imported; the command flushes its output and leaves
    without running that teardown.  (Tests call :func:`main`, which exits normally.)
    """
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
