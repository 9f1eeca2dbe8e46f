"""Reading a file a user names, safely (a regular file only, bounded, never blocking), and
replacing one atomically.

``Path.read_bytes()`` on ``/dev/zero`` never ends, and on a FIFO it blocks until a writer comes;
``stat().st_size`` is 0 for both, so a size check before reading does not help. Every file an
operator names on the command line or in a config (manifests, settings, secret references, sealed
envelopes, attestation documents, certificates) is read through :func:`read_regular_file`.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class FileProblem(ValueError):
    """Why a file cannot be read: one line, safe to show (the OS error or the rule it broke)."""


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises :class:`FileProblem` for a missing or unreadable file, a directory, a device or a FIFO
    (opened without blocking, then refused before any read), and a file over ``limit`` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FileProblem(exc.strerror or str(exc)) from None
    except ValueError:  # "embedded null byte": a path from YAML may carry "\0"
        raise FileProblem("the path contains a NUL character") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileProblem("Is a directory")  # the OS's own words for it
        if not stat.S_ISREG(mode):
            raise FileProblem("not a regular file (a device or a FIFO would never end or never start)")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise FileProblem(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise FileProblem(f"larger than {limit} bytes")
    return b"".join(chunks)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole or not at all: readers see the old file or the new one.

    The data goes to a temporary file in the same directory (mode 0600 from the start: mkstemp's),
    is flushed to disk, then renamed over ``path``. A plain write that fails (a full disk) would
    leave a truncated file where a good one was.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
