"""Only regular files are read as model inputs.

Opening a FIFO blocks until someone writes to it, and a character device such as /dev/zero
never ends; either named as a shard, index or config would hang a merge forever. So every
input file is ``stat``-ed and refused unless it is a regular file, before it is opened.
"""

from __future__ import annotations

import os
import stat

from weightsmith.errors import CheckpointError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: str | os.PathLike[str], mode: int) -> CheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    return CheckpointError(
        f"{path}: not a regular file (it is {kind}); name the model's real .safetensors/.json "
        "files — weightsmith never reads pipes, devices or folders as model files"
    )


def require_regular_file(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), refusing anything but a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:  # an embedded NUL byte
        raise CheckpointError(f"{path!r}: not a usable file name ({e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file ``path``.

    Checked before opening, and again on the open descriptor: O_NONBLOCK keeps a FIFO swapped
    in between the two from blocking the open (it has no effect on regular files).
    """
    require_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return fd


def read_regular_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of a small regular file (an index or a config)."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    finally:
        os.close(fd)
