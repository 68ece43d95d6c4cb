"""The byte-moving floor of a merge: read every input byte once, write the output bytes once.

    python benchmarks/floor.py OUT_FILE OUT_BYTES INPUT_DIR [INPUT_DIR ...]

No math, no parsing beyond finding the shards: what any merge tool must at least do. Reads
use ``preadv`` into one reused buffer (what a careful reader does); the output is written in
the same chunk size and then removed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHUNK = 64 * 2**20


def main() -> None:
    out_file, out_bytes, *inputs = sys.argv[1:]
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total_read = 0
    for folder in inputs:
        for shard in sorted(Path(folder).glob("*.safetensors")):
            fd = os.open(shard, os.O_RDONLY)
            try:
                offset = 0
                while True:
                    n = os.preadv(fd, [view], offset)
                    if n == 0:
                        break
                    offset += n
                total_read += offset
            finally:
                os.close(fd)
    remaining = int(out_bytes)
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while remaining > 0:
            n = os.write(fd, view[: min(CHUNK, remaining)])
            remaining -= n
    finally:
        os.close(fd)
        os.unlink(out_file)
    print(f"read {total_read} bytes, wrote {out_bytes} bytes")


if __name__ == "__main__":
    main()
