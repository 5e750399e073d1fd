"""The client's side of uploads: encoded images sent instead of paths, and the masks that
come back in their answers, written where the client asked, named as the daemon names
them (model.masks.mask_path) and byte for byte the file it would write.

Why apart from client.py: what is read, how it is chunked and what is done with an
answer's mask is its own job; the submission's flow (acks, busy, cancel, liveness) is the
same for paths and uploads and stays there. Uploads go as raw frames of a `submit`
(core.wire), at most MAX_DATA_FRAMES and about UPLOAD_CHUNK_BYTES a message, each file read
as it is sent (not all at once); one larger than the daemon's --max-upload-bytes (the
status reply says it) is answered here with the reason, never sent.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.core import wire
from pspnet.core.files import FileReadError, read_regular_file
from pspnet.core.uploads import upload_refusal
from pspnet.model.masks import mask_path, mask_source, store_mask

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UPLOAD_CHUNK_BYTES = 16 << 20    # bytes of images in one submit message (at least one image)


@dataclass(frozen=True)
class Upload:
    """What an upload asks: `want` back in the answer (wire.WANT_PNG, WANT_LABELS,
    WANT_CLASSES), whether the daemon also writes the mask under its --out (`write`), and
    a folder of this host to write the returned PNGs into (`out_dir`)."""

    want: str = wire.WANT_PNG
    write: bool = False
    out_dir: Path | None = None


class UploadSide:
    """One submission's uploads: what to send, and what its answers bring back."""

    def __init__(self, options: Upload, blobs: dict[str, bytes] | None = None) -> None:
        if options.want not in wire.WANTS[1:]:
            raise ValueError(f"want must be one of {wire.WANTS[1:]}, not {options.want!r}")
        self.options = options
        self.blobs = blobs or {}            # path -> bytes given in memory (Client.upload)
        self.max_upload: int | None = None  # the daemon's, from its status reply
        self.unsupported = False            # a daemon older than uploads

    def requests(self, requests: list[wire.Request]) -> list[wire.Request]:
        return [dataclasses.replace(r, want=self.options.want, write=self.options.write)
                for r in requests]

    def heard(self, body: dict[str, Any]) -> None:
        limit = (body.get("daemon") or {}).get("max_upload_bytes")
        if isinstance(limit, int) and limit > 0:
            self.max_upload = limit
        elif self.max_upload is None:       # it says no limit: it takes no uploads
            self.max_upload, self.unsupported = 0, True

    def chunk(self, to_send: collections.deque[wire.Request],
              refuse: Callable[[wire.Request, str], None]) -> list[wire.Request] | None:
        """The next submit's requests, with their bytes; None until the daemon's limit is
        known. One that cannot be read or is too large is `refuse`d (answered here)."""
        if self.max_upload is None:
            return None
        chunk: list[wire.Request] = []
        size = 0
        while to_send and self.unsupported:
            refuse(to_send.popleft(), "this daemon takes no uploads (a version before "
                                      "them): send paths, or upgrade it")
        while to_send and len(chunk) < wire.MAX_DATA_FRAMES:
            r = to_send[0]
            data, problem = self._bytes(r.path)
            if problem is None:
                problem = upload_refusal(len(data), self.max_upload)
            if problem is not None:
                to_send.popleft()
                refuse(r, problem)
                continue
            if chunk and size + len(data) > UPLOAD_CHUNK_BYTES:
                break                        # the next message's
            to_send.popleft()
            chunk.append(dataclasses.replace(r, data=data))
            size += len(data)
        return chunk

    def _bytes(self, path: str) -> tuple[bytes, str | None]:
        if path in self.blobs:
            data = self.blobs[path]
            return data, None if data else "an empty image (0 bytes)"
        return read_upload(path, self.max_upload or 0)


def read_upload(path: str, max_bytes: int) -> tuple[bytes, str | None]:
    """A file's bytes, or why not (one line naming the path): read as the workers read an
    image (core.files); one over `max_bytes` is refused in the daemon's words."""
    try:
        return read_regular_file(path, max_bytes, "an upload"), None
    except FileReadError as exc:
        if exc.size is not None:
            return b"", upload_refusal(exc.size, max_bytes)
        return b"", f"cannot read {path}: {exc}"


def returned_answer(answer: Any, result: wire.Result, options: Upload) -> Any:
    """The answer with the mask its result carries back: `png` (written under
    `options.out_dir` as the daemon would name it, `mask` then its path there) or
    `labels` (uint8 height x width)."""
    if result.payload is None:
        return answer
    png = labels = None
    if result.returned == wire.WANT_PNG:
        png = bytes(result.payload)
        if not png.startswith(PNG_SIGNATURE):     # written under --out: a PNG, or nothing
            return dataclasses.replace(answer, status=wire.ERROR, error=(
                f"the returned mask is not a PNG ({len(png)} bytes): not written"))
    elif result.size is not None:
        height, width = result.size
        if len(result.payload) != height * width:
            return dataclasses.replace(answer, status=wire.ERROR, error=(
                f"the returned label map has {len(result.payload)} bytes, not {height} x "
                f"{width}"))
        labels = np.frombuffer(result.payload, np.uint8).reshape(result.size)
    mask = answer.mask
    if png is not None and options.out_dir is not None:
        try:
            target = mask_path(options.out_dir, answer.path)
            store_mask(png, target, mask_source(answer.path))
        except (OSError, ValueError) as exc:
            return dataclasses.replace(answer, status=wire.ERROR, png=png,
                                       error=f"cannot write the returned mask: {exc}")
        mask = str(target)
    return dataclasses.replace(answer, png=png, labels=labels, mask=mask)
