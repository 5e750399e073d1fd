"""Uploads' limits: how large an encoded image, a returned mask and the frames that carry
them may be, on each socket that carries them.

Why a module: the control sockets refuse any frame over MAX_CONTROL_FRAME_BYTES before
allocating it (ZMQ_MAXMSGSIZE), and uploads and returned label maps are larger. Only the
sockets on their path allow more, and only as much as the settings say: the client door
(an upload: --max-upload-bytes), the preprocess workers' control DEALER (the same
bytes, from the front) and the front's control ROUTER (a returned mask: one label map of
--max-pixels, or its PNG).
"""

from __future__ import annotations

from pspnet.core import wire
from pspnet.core.pipeline import Stage


def is_upload(request: wire.Request) -> bool:
    """A request with more than a path: an upload's bytes, or an answer to carry back."""
    return request.data is not None or bool(request.want) or not request.write


def returned_bytes(max_pixels: int) -> int:
    """The largest mask an answer carries back: the uint8 label map of --max-pixels, or
    its PNG (zlib's stored blocks and one filter byte per row add under 1/64)."""
    return max_pixels + max_pixels // 64 + (64 << 10)


def front_frame_limit(max_pixels: int) -> int:
    """ZMQ_MAXMSGSIZE of the front's control ROUTER: control, or a returned mask."""
    return max(wire.MAX_CONTROL_FRAME_BYTES, returned_bytes(max_pixels))


def worker_frame_limit(stage: Stage, max_upload_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE of a worker's control DEALER: control, and for preprocess workers
    the uploads the front dispatches to them."""
    if stage == Stage.PREPROCESS:
        return max(wire.MAX_CONTROL_FRAME_BYTES, max_upload_bytes)
    return wire.MAX_CONTROL_FRAME_BYTES


def door_frame_limit(max_upload_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE of the client door: a header, or one upload. A client learns the
    limit from the status reply and refuses a larger file itself, with the reason; a peer
    that sends one anyway is disconnected before anything is allocated."""
    return max(wire.MAX_HEADER_BYTES, max_upload_bytes)


def upload_refusal(nbytes: int, max_upload_bytes: int) -> str | None:
    """Why an upload of `nbytes` is refused (None: it is not), in the user's words."""
    if nbytes > max_upload_bytes:
        return (f"upload of {nbytes} bytes is over the daemon's --max-upload-bytes "
                f"{max_upload_bytes}: send it as a JPEG (a 48 Mpx one is about 20 MB), its "
                "path where the daemon can read it, or restart the daemon with a higher "
                "--max-upload-bytes")
    return None
