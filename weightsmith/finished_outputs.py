"""Outputs the running command has finished (renamed into place), so that its Ctrl-C message
tells the truth: an interrupt that lands just after an output's final rename must not say the
output was lost.

Layer 0: weightsmith.io.output_dir records here at each commit; weightsmith.cli_errors marks
where each command starts, and the commands' interrupt messages read it.
"""

from __future__ import annotations

import os
from pathlib import Path

_finished: list[Path] = []
_command_start = 0


def start_command() -> None:
    """Forget what earlier commands of this process finished (tests run many in one)."""
    global _command_start
    _command_start = len(_finished)


def record(out: str | os.PathLike[str]) -> None:
    """Note that ``out`` is complete in its final place."""
    _finished.append(Path(out).absolute())


def this_command() -> list[Path]:
    """The outputs finished since the running command started, in order."""
    return list(_finished[_command_start:])


def is_finished(out: str | os.PathLike[str]) -> bool:
    return Path(out).absolute() in _finished[_command_start:]


def state(out: str | os.PathLike[str], otherwise: str) -> str:
    """``out`` and what an interrupt left of it: complete when the running command finished it,
    else ``otherwise`` ("was not written ...")."""
    if is_finished(out):
        return f"{out} is complete (it was finished before the interrupt)"
    return f"{out} {otherwise}"
