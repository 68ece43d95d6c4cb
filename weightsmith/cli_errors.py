"""How every command ends on an error or a signal: one clear line and an exit code.

Layer 0 (it imports only weightsmith.errors and click), so every command uses it: cli.py, the
fine-tuning commands (weightsmith/finetune/cli.py) and the workflow commands (commands/).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, overload

import click

from weightsmith import finished_outputs
from weightsmith.errors import WeightsmithError

NOTHING_WRITTEN = "interrupted: nothing was written (the partial output was removed)"
WRITES_NOTHING = "interrupted (this command writes nothing)"
# What a command says when Ctrl-C/SIGTERM stops it: a fixed line, or one made from the
# command's own parameters (click passes them as keyword arguments) for a command that keeps
# something on purpose (a search's trial log, a finished first stage).
InterruptMessage = str | Callable[[dict[str, Any]], str]
F = TypeVar("F", bound=Callable[..., Any])


@overload
def friendly(fn: F) -> F: ...


@overload
def friendly(*, on_interrupt: InterruptMessage = NOTHING_WRITTEN) -> Callable[[F], F]: ...


def friendly(fn: Any = None, *, on_interrupt: InterruptMessage = NOTHING_WRITTEN) -> Any:
    """Turn library errors into one clear line and an exit code; Ctrl-C/SIGTERM into 130.

    ``@friendly`` promises that an interrupted command left nothing behind (its outputs are
    atomic: weightsmith.io.output_dir); ``@friendly(on_interrupt=...)`` says instead what an
    interrupted command keeps. The first Ctrl-C or SIGTERM starts the clean-up; later ones are
    ignored until the process exits, so a burst of them cannot cut the clean-up short (leaving
    a temporary folder) or raise into the interpreter's exit handlers.
    """
    if fn is None:
        return lambda f: _wrap(f, on_interrupt)
    return _wrap(fn, on_interrupt)


def _wrap(fn: F, on_interrupt: InterruptMessage) -> F:
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
        finished_outputs.start_command()
        try:
            return fn(*args, **kwargs)
        except WeightsmithError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)  # exiting: nothing more to interrupt
            message = on_interrupt if isinstance(on_interrupt, str) else on_interrupt(kwargs)
            done = finished_outputs.this_command()
            if message == NOTHING_WRITTEN and done:  # the interrupt came after the final rename
                message = (f"interrupted after {', '.join(map(str, done))} "
                           f"{'was' if len(done) == 1 else 'were'} complete: kept as written")
            click.echo(message, err=True)
            sys.exit(130)
        finally:
            if not signalled:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    wrapper.ends_friendly = True  # type: ignore[attr-defined]  # tests check every command has it
    return wrapper  # type: ignore[return-value]
