"""Reading a whole input file (an image, a ground truth, an upload) safely, in one place.

Why its own module: the workers read images and ground truths, the client library reads
the files it uploads, and both must refuse the same things the same way (a folder, a FIFO
or a device named like an image, an empty file, one over the limit) without hanging or
reading hundreds of megabytes; the daemon's side cannot import the image code (cv2).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def shown_path(path: str | Path) -> str:
    """A path as it can be printed and logged: bytes of a name that is not UTF-8 (Python
    keeps them as lone surrogates) written as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def name_problem(path: str | Path) -> str | None:
    """Why a path cannot travel in the daemon's messages (which carry names as UTF-8):
    a file name in another encoding (an old Latin-1 archive's "caf\\xe9.jpg"); None if
    it can. Refused for that file alone, with the fix."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return (f"file name is not UTF-8: {shown_path(path)}; rename it to UTF-8 (for a "
                "Latin-1 name: convmv -f latin1 -t utf8 --notest FILE)")
    return None


class FileReadError(ValueError):
    """A file that cannot be read as an input; the message is a one-liner for the user.
    `incomplete`: it looked unfinished (empty), so the file may still change; `size`: its
    bytes when it is over the limit (a caller may word that refusal its own way)."""

    def __init__(self, message: str, incomplete: bool = False, size: int | None = None,
                 ) -> None:
        super().__init__(message)
        self.incomplete = incomplete
        self.size = size


def read_regular_file(path: str | Path, max_bytes: int, what: str = "an image") -> bytes:
    """The whole file in one read, at most `max_bytes`; `what` names it in the limit's
    message. Opened non-blocking and checked to be a regular file first, so a FIFO or a
    device cannot hang or flood the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileReadError("no such file") from None
    except IsADirectoryError:
        raise FileReadError("is a directory") from None
    except PermissionError:
        raise FileReadError("permission denied") from None
    except NotADirectoryError:
        raise FileReadError("no such file (a parent is not a directory)") from None
    except OSError as e:
        raise FileReadError(f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileReadError("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError("not a regular file")
        if st.st_size == 0:
            raise FileReadError("empty file (0 bytes)", incomplete=True)
        if st.st_size > max_bytes:
            raise FileReadError(f"file is {st.st_size / 1e6:.1f} MB, over the "
                                f"{max_bytes / 1e6:.1f} MB limit for {what}", size=st.st_size)
        data = _read_all(fd, min(st.st_size, max_bytes) + 1, max_bytes + 1)
    except OSError as e:
        if isinstance(e, PermissionError):
            raise FileReadError("permission denied") from None
        raise FileReadError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if not data:
        raise FileReadError("empty file (0 bytes)", incomplete=True)
    if len(data) > max_bytes:
        raise FileReadError(f"file is over the {max_bytes / 1e6:.1f} MB limit for {what}",
                            size=len(data))
    return data


def _read_all(fd: int, first: int, limit: int) -> bytes:
    """Up to `limit` bytes of `fd`, asking `first` (the size fstat gave, plus one) at once:
    two read(2)s for a file that did not change. A file object's read(limit) allocates
    `limit` (hundreds of MB, mapped and unmapped) and asks the terminal and the offset
    first: six syscalls more per ground truth or image."""
    parts, size = [], 0
    while size < limit:
        want = first - size if size < first else 1 << 16      # then: grown since fstat
        piece = os.read(fd, min(limit - size, want))
        if not piece:
            break
        parts.append(piece)
        size += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)
