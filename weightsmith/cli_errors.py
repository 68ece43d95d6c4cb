"""How every command ends on an error or a signal: one clear line and an exit code."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from weightsmith.errors import WeightsmithError


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one clear line and an exit code; Ctrl-C/SIGTERM into 130.

    The first Ctrl-C or SIGTERM starts the clean-up; later ones are ignored until the process
    exits, so a burst of them cannot cut the clean-up short (leaving a temporary folder) or
    raise into the interpreter's exit handlers.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signalled = []

        def on_signal(signum: int, frame: Any) -> None:
            signalled.append(signum)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            raise KeyboardInterrupt

        try:
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signal handling as it is
            previous = {}
        try:
            return fn(*args, **kwargs)
        except WeightsmithError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)  # exiting: nothing more to interrupt
            click.echo("interrupted: nothing was written (the partial output was removed)", err=True)
            sys.exit(130)
        finally:
            if not signalled:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return wrapper
