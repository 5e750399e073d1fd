"""The one module that owns the wire format between processes.

Every message is a multipart ZeroMQ message: frame 0 is a msgpack map (the header) with
`v` (version) and `kind`; large arrays follow as raw frames, described in the header by
dtype and shape and referenced by position. Nothing is pickled. `decode` validates every
field before anything else touches it and raises `WireError` on the first problem, so a
malformed message is dropped (and answered as an error where its id can be read) instead
of crashing a stage.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import numpy as np

from pspnet.core.pipeline import Stage

WIRE_VERSION = 3
MAX_HEADER_BYTES = 64 * 1024        # msgpack header frame
MAX_STRING_CHARS = 4096             # paths, ids, error messages
MAX_NAME_CHARS = 64                 # a worker's name: stage-index-pid
MAX_SIDE_PIXELS = 8192              # model input side, output side
MAX_PHOTO_SIDE = 1 << 20            # a photo's height or width (decoders refuse more)
# where a worker's sockets are: tcp with a host (a name, IPv4 or [IPv6]) and a port, or ipc
ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9.:_%-]+):[0-9]{1,5}|ipc://[^\s]+")
MAX_CLASSES = 1024
MAX_DATA_FRAMES = 32               # encoded images in one submit or dispatch (uploads)
MAX_FRAMES = 4 + MAX_DATA_FRAMES
MAX_STATS_ENTRIES = 64
MAX_IDS = 4096                      # ids in one note
MAX_PEERS = 256                     # executors in one peers message
DEFAULT_MAX_PIXELS = 50_000_000     # an image's pixels (--max-pixels): a placement's original
                                    # size is checked against it before anything allocates it
MAX_CONTROL_FRAME_BYTES = 1 << 20   # a frame on a control socket (ZMQ_MAXMSGSIZE): headers,
                                    # and a result's areas (4 x MAX_CLASSES int64); sockets
                                    # that carry uploads or returned masks allow those
                                    # (core.uploads)
# What an answer carries back (Request.want): the palette PNG, the raw uint8 label map, or
# only the classes found ("" : a path request's answer, the mask written under --out).
WANT_PNG, WANT_LABELS, WANT_CLASSES = "png", "labels", "classes"
WANTS = ("", WANT_PNG, WANT_LABELS, WANT_CLASSES)

# Message kinds: explicit, never inferred from frame counts. Pixels and outputs flow between
# the stage processes (DISPATCH names where to send them); the front carries control only.
DISPATCH = "dispatch"    # front -> preprocess: decode these, send the pixels to executor `to`
IMAGE = "image"          # preprocess -> executor: letterboxed uint8 pixels
OUTPUT = "output"        # executor -> postprocess: one image's logits or labels
CREDIT = "credit"        # postprocess -> executor: room for this many more outputs
TOOK = "took"            # executor -> front: these requests are in a batch (room again)
HANDED = "handed"        # preprocess / executor -> front: these requests left me for `to`
RESULT = "result"        # a stage -> front, front -> client: the answer for one request
RESULTS = "results"      # the same for several requests at once (control per batch)
HEARTBEAT = "heartbeat"  # every worker -> front, from its work loop: alive, where, counters
PEERS = "peers"          # front -> postprocess: the executors' output addresses
SUBMIT = "submit"        # client -> daemon: run these paths
STATUS = "status"        # client -> daemon: how are things
REPLY = "reply"          # daemon -> client: answer to submit (accepted/busy), status, cancel
CANCEL = "cancel"        # client -> daemon: drop these requests of mine that have not started
RELOAD = "reload"        # client -> daemon: serve this model directory from now on (live)

KINDS = (DISPATCH, IMAGE, OUTPUT, CREDIT, TOOK, HANDED, RESULT, RESULTS, HEARTBEAT, PEERS,
         SUBMIT, STATUS, REPLY, CANCEL, RELOAD)
OK, ERROR = "ok", "error"
STORAGE = "storage"          # the mask could not be stored: disk full, quota, read-only, EIO
INCOMPLETE = "incomplete"    # the input looked unfinished (empty, truncated): it may change
CAUSES = (STORAGE, INCOMPLETE)
ARRAY_DTYPES = {"uint8", "int32", "int64", "float16", "float32"}


class WorkerId:
    """Who a worker is: its stage, its number in that stage, and this life's pid. On the
    wire (a socket identity, a note's `to`) it is `stage-index-pid`, so each life of a
    worker is a new peer; `parse` is the one reader of that form."""

    __slots__ = ("stage", "index", "pid", "text")

    def __init__(self, stage: Stage, index: int, pid: int) -> None:
        self.stage, self.index, self.pid = Stage(stage), index, pid
        self.text = f"{self.stage.value}-{index}-{pid}"

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"WorkerId({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerId) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def encode(self) -> bytes:
        """As a ZeroMQ socket identity."""
        return self.text.encode("ascii")

    @classmethod
    def parse(cls, text: str | bytes) -> WorkerId:
        """`stage-index-pid` -> WorkerId, or WireError for anything else."""
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("ascii", "replace")
        parts = text.split("-") if len(text) <= MAX_NAME_CHARS else ()
        if len(parts) != 3 or parts[0] not in _STAGE_NAMES or not _digits(parts[1], 4) \
                or not _digits(parts[2], 10):
            raise WireError(f"not a worker's name (stage-index-pid): {text[:80]!r}")
        return cls(Stage(parts[0]), int(parts[1]), int(parts[2]))


_STAGE_NAMES = frozenset(s.value for s in Stage)


@functools.lru_cache(maxsize=4096)
def peer(identity: bytes) -> WorkerId:
    """A socket identity -> WorkerId, parsed once per peer (the front hears it on every
    message), or WireError. `name/what` is a helper thread's own socket of worker `name`
    (its heartbeats during a long step)."""
    return WorkerId.parse(identity.split(b"/", 1)[0])


def _digits(text: str, most: int) -> bool:
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


class WireError(ValueError):
    """A message that does not follow this format. `request_id` is set when it was readable."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    """One image to segment, as it travels through every stage."""

    id: str
    path: str
    ann: str | None = None        # ground-truth palette PNG, for mIoU
    attempt: int = 0              # bumped when a request is retried after a crash
    token: str = ""               # the front's, per dispatch (core.trust); "" from clients
    want: str = ""                # WANTS: what the answer carries back
    write: bool = True            # write the mask under --out (uploads: only if asked)
    data: Any = None              # an upload: the encoded image (a buffer), sent as a raw
                                  # frame of a submit or dispatch, never in the header


@dataclass(frozen=True)
class Placement:
    """Where the original image sits inside the model input: what postprocess undoes."""

    orig_h: int
    orig_w: int
    scale: float
    top: int
    left: int
    height: int
    width: int

    def box(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.height, self.width)


@dataclass(frozen=True)
class Dispatch:
    """Front -> preprocess: a group of requests, and the executor (`to`, listening at
    `address`) whose room the front has set aside for their pixels. One message per group:
    the front's cost is per message, not per image."""

    requests: tuple[Request, ...]
    to: str                       # the executor's name, stage-index-pid
    address: str                  # where that executor receives images
    tokens: tuple[str, ...] | None = None   # the front's: each request's token on the
                                  # wire (the requests carry none yet: no Request made per
                                  # image to add it); decoded, each Request holds its own


@dataclass(frozen=True)
class Image:
    request: Request
    placement: Placement
    to: str                       # the executor meant: one restarted since drops it
    pixels: np.ndarray            # uint8 S x S x 3, RGB


@dataclass(frozen=True)
class Output:
    request: Request
    placement: Placement
    head: str                     # "logits" (C x h x w float) or "labels" (S x S uint8)
    data: np.ndarray


@dataclass(frozen=True)
class Credit:
    """Postprocess -> executor: room for `credits` more outputs from that executor."""

    credits: int


@dataclass(frozen=True)
class Result:
    id: str
    attempt: int
    status: str                   # OK or ERROR
    path: str = ""
    mask: str | None = None
    error: str | None = None
    stage: str = ""               # which stage answered (errors: which stage refused)
    areas: np.ndarray | None = None  # int64 4 x C: intersect, union, pred, label (with GT)
    cause: str | None = None      # an error that may pass: STORAGE or INCOMPLETE (watch
                                  # mode retries those); None: final
    size: tuple[int, int] | None = None   # the image's height and width (answers: ok)
    found: tuple[tuple[int, str, int], ...] = ()   # (class id, name, pixels), largest first
    token: str = ""               # a stage's answer: its request's token (core.trust)
    payload: Any = None           # what the request wanted back (a buffer): PNG bytes or
                                  # the uint8 label map of `size`, a raw frame
    returned: str = ""            # WANT_PNG or WANT_LABELS when `payload` is set
    model: str = ""               # an answer to a client: the version of the model that
                                  # made it (model.manifest.model_version); "" none did


@dataclass(frozen=True)
class OkAnswers:
    """Ok answers without a returned payload, column by column (issue 27): what a Results
    message carries for the common case, so that the front reads a message's answers
    without a Python object per answer. Answer `i` is `ids[i]`, `attempts[i]`, ...; its
    found classes are the next `counts[i]` entries of `classes` and `pixels` (largest
    first), named once per message in `names`; its areas are row `rows[i]` of `areas`
    (-1: none)."""

    ids: list[str]
    attempts: list[int]
    tokens: list[str]
    paths: list[str]
    masks: list[str | None]
    stages: list[str]
    models: list[str]
    sizes: list[int]              # height, width of each, flat; 0, 0: none
    counts: list[int]             # found classes per answer
    classes: list[int]            # their class ids, flat
    pixels: list[int]             # and pixels, flat
    names: dict[int, str]         # class id -> name, once per message
    rows: list[int]               # each answer's row of `areas`; -1: none
    areas: np.ndarray | None      # int64 K x 4 x C

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, results: Sequence[Result], rows: list[np.ndarray]) -> OkAnswers:
        """Columns of `results` (ok, no error, no payload); each one's areas appended to
        `rows`, which the caller stacks into the message's one areas frame."""
        sizes: list[int] = []
        counts, classes, pixels, names, answer_rows = [], [], [], {}, []
        for r in results:
            sizes.extend(r.size if r.size is not None else (0, 0))
            counts.append(len(r.found))
            for cid, name, n in r.found:
                classes.append(cid)
                pixels.append(n)
                names[cid] = name
            if r.areas is None:
                answer_rows.append(-1)
            else:
                answer_rows.append(len(rows))
                rows.append(r.areas)
        return cls([r.id for r in results], [r.attempt for r in results],
                   [r.token for r in results], [r.path for r in results],
                   [r.mask for r in results], [r.stage for r in results],
                   [r.model for r in results], sizes, counts, classes, pixels, names,
                   answer_rows, None)

    def pick(self, chosen: list[int], areas: bool = True) -> OkAnswers:
        """The answers at indices `chosen` (in that order), as a message of their own: the
        flat columns sliced, the areas rows taken into a frame of their own (`areas`
        False: none)."""
        if chosen == list(range(len(self.ids))):
            picked = self
        else:
            sizes, starts, at = self.sizes, [], 0
            for n in self.counts:
                starts.append(at)
                at += n
            classes: list[int] = []
            pixels: list[int] = []
            counts = [self.counts[i] for i in chosen]
            for i, n in zip(chosen, counts, strict=True):
                classes += self.classes[starts[i]:starts[i] + n]
                pixels += self.pixels[starts[i]:starts[i] + n]
            picked = OkAnswers(
                [self.ids[i] for i in chosen], [self.attempts[i] for i in chosen],
                [self.tokens[i] for i in chosen], [self.paths[i] for i in chosen],
                [self.masks[i] for i in chosen], [self.stages[i] for i in chosen],
                [self.models[i] for i in chosen],
                [v for i in chosen for v in (sizes[2 * i], sizes[2 * i + 1])], counts,
                classes, pixels, self.names, [self.rows[i] for i in chosen], self.areas)
        rows = picked.rows
        have = [r for r in rows if r >= 0] if areas and picked.areas is not None else []
        if have == list(range(len(picked.areas) if picked.areas is not None else 0)) \
                and len(have) == len(rows) - rows.count(-1):
            return picked                       # the frame is exactly theirs already
        new_rows, k = [], 0
        for r in rows:
            if r >= 0 and have:
                new_rows.append(k)
                k += 1
            else:
                new_rows.append(-1)
        return dataclasses.replace(picked, rows=new_rows,
                                   areas=picked.areas[have] if have else None)

    def found(self) -> list[tuple[tuple[int, str, int], ...]]:
        """Each answer's found classes as Result.found has them."""
        classes = self.classes           # every (id, name, pixels) made at C level, then cut
        triples = list(zip(classes, map(self.names.__getitem__, classes), self.pixels,
                           strict=True))
        out, at = [], 0
        for n in self.counts:
            out.append(tuple(triples[at:at + n]))
            at += n
        return out

    def each(self) -> list[Result]:
        """One Result per answer (a client's library, tests; the front reads columns)."""
        sizes, rows, areas, found = self.sizes, self.rows, self.areas, self.found()
        return [Result(rid, self.attempts[i], OK, self.paths[i], self.masks[i], None,
                       self.stages[i],
                       None if rows[i] < 0 or areas is None else areas[rows[i]], None,
                       (sizes[2 * i], sizes[2 * i + 1]) if sizes[2 * i] else None,
                       found[i], self.tokens[i], None, "", self.models[i])
                for i, rid in enumerate(self.ids)]


@dataclass(frozen=True)
class Results:
    """Several answers in one message: a postprocess worker's results of a few ms, the
    daemon's answers to one client in one turn. Each is answered as if sent alone. On
    the wire, ok answers without a payload go as columns (`OkAnswers`); decoded, they
    are `ok` and `results` holds the others (errors) alone; `each()` gives them all."""

    results: tuple[Result, ...]
    ok: OkAnswers | None = None

    def each(self) -> tuple[Result, ...]:
        """Every answer as a Result, the columns' first."""
        return self.results if self.ok is None else (*self.ok.each(), *self.results)

    def __len__(self) -> int:
        return len(self.results) + (0 if self.ok is None else len(self.ok))


@dataclass(frozen=True)
class Took:
    """Executor -> front: these requests are in a batch now, so that room is free again."""

    ids: tuple[str, ...]


@dataclass(frozen=True)
class Handed:
    """Preprocess / executor -> front: these requests' data left me for worker `to`.
    `took`: an executor's "took" ids of the same slice, moved first (one message for both
    notes, not two: the front's cost is per message)."""

    ids: tuple[str, ...]
    to: str
    took: tuple[str, ...] = ()


@dataclass(frozen=True)
class Heartbeat:
    """Worker -> front, from its work loop: alive and making progress, where it receives
    data, how much it can hold, its counters. The first one introduces a worker."""

    stage: Stage
    index: int
    pid: int
    counters: dict[str, float] = field(default_factory=dict)
    inputs: str = ""              # executor: where preprocess sends images
    outputs: str = ""             # executor: where postprocess asks for outputs
    capacity: int = 0             # requests the front may route to it beyond what it runs
    batch: int = 0                # executor: its static batch size
    stuck: str | None = None      # a thread of its work loop stopped making progress: why
    fatal: str | None = None      # set once by a worker that cannot start, just before exit
    model: str = ""               # the version of the model it serves (a live reload runs
                                  # two: the front routes each request within one)


@dataclass(frozen=True)
class Peers:
    """Front -> postprocess: every executor's name and output address, and the credits to
    give each (its room for that executor's outputs)."""

    executors: tuple[tuple[str, str], ...]
    credits: int


@dataclass(frozen=True)
class Submit:
    requests: tuple[Request, ...]


@dataclass(frozen=True)
class Cancel:
    """Client -> daemon: its requests under these ids that are still queued are dropped
    (answered by a `cancelled` Reply naming them); those already running finish."""

    ids: tuple[str, ...]


@dataclass(frozen=True)
class StatusQuery:
    pass


@dataclass(frozen=True)
class Reload:
    """Client -> daemon: load `model` (a directory on the daemon's host; "" the one it
    serves, read again) beside the running one and switch to it; the daemon replies
    `reloaded` once new requests go to it, or `error` with the reason (the old one keeps
    serving). `force`: even if its classes differ."""

    model: str = ""
    force: bool = False


@dataclass(frozen=True)
class Reply:
    """Daemon -> client: `accepted`/`busy`/`error` for a submit, or a status document."""

    status: str
    ids: tuple[str, ...] = ()
    message: str = ""
    body: dict[str, Any] = field(default_factory=dict)


M = TypeVar("M")

Message = (Dispatch | Image | Output | Credit | Result | Results | Took | Handed | Heartbeat
           | Peers | Submit | StatusQuery | Reply | Cancel | Reload)


# ---------------------------------------------------------------------------------------
# encode


def encode(msg: Message) -> list[Any]:
    """Message -> frames. Arrays go out as their own frames (zero-copy when sent so)."""
    arrays: list[np.ndarray] = []
    header: dict[str, Any] = {"v": WIRE_VERSION}
    if isinstance(msg, Dispatch):
        header |= {"kind": DISPATCH, **_dispatched(msg, arrays), "to": msg.to,
                   "address": msg.address}
    elif isinstance(msg, Image):
        header |= {"kind": IMAGE, "req": _request_fields(msg.request),
                   "place": _placement_fields(msg.placement), "to": msg.to,
                   "arrays": [_describe(msg.pixels)]}
        arrays.append(msg.pixels)
    elif isinstance(msg, Output):
        header |= {"kind": OUTPUT, "req": _request_fields(msg.request),
                   "place": _placement_fields(msg.placement), "head": msg.head,
                   "arrays": [_describe(msg.data)]}
        arrays.append(msg.data)
    elif isinstance(msg, Credit):
        header |= {"kind": CREDIT, "credits": msg.credits}
    elif isinstance(msg, Result):
        header |= {"kind": RESULT, **_result_fields(msg),
                   "arrays": [] if msg.areas is None else [_describe(msg.areas)]}
        if msg.areas is not None:
            arrays.append(msg.areas)
        if msg.payload is not None:        # the last frame, raw
            header["ret"] = msg.returned
            arrays.append(msg.payload)
    elif isinstance(msg, Results):
        header |= {"kind": RESULTS, **_results_fields(msg.results, arrays, msg.ok)}
    elif isinstance(msg, Took):
        header |= {"kind": TOOK, "ids": list(msg.ids)}
    elif isinstance(msg, Handed):
        header |= {"kind": HANDED, "ids": list(msg.ids), "to": msg.to}
        if msg.took:
            header["took"] = list(msg.took)
    elif isinstance(msg, Heartbeat):
        header |= {"kind": HEARTBEAT, "stage": msg.stage, "index": msg.index, "pid": msg.pid,
                   "counters": dict(msg.counters), "inputs": msg.inputs,
                   "outputs": msg.outputs, "capacity": msg.capacity, "batch": msg.batch,
                   "stuck": msg.stuck, "fatal": msg.fatal, "model": msg.model}
    elif isinstance(msg, Peers):
        header |= {"kind": PEERS, "executors": [list(e) for e in msg.executors],
                   "credits": msg.credits}
    elif isinstance(msg, Submit):
        header |= {"kind": SUBMIT, "reqs": _requests_with_data(msg.requests, arrays)}
    elif isinstance(msg, StatusQuery):
        header |= {"kind": STATUS}
    elif isinstance(msg, Cancel):
        header |= {"kind": CANCEL, "ids": list(msg.ids)}
    elif isinstance(msg, Reload):
        header |= {"kind": RELOAD, "model": msg.model, "force": msg.force}
    elif isinstance(msg, Reply):
        header |= {"kind": REPLY, "status": msg.status, "ids": list(msg.ids),
                   "message": msg.message, "body": msg.body}
    else:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    frames: list[Any] = [msgpack.packb(header, use_bin_type=True)]
    frames.extend(a if not isinstance(a, np.ndarray) else np.ascontiguousarray(a).data
                  for a in arrays)
    return frames


def _dispatched(msg: Dispatch, frames: list[Any]) -> dict[str, Any]:
    """A dispatch's requests: plain path requests (the common case) as columns ("cols":
    ids, paths, anns, attempts, tokens), with no map per request; a group with an upload,
    or one that wants something back, one map each ("reqs")."""
    requests, tokens = msg.requests, msg.tokens
    if tokens is not None and len(tokens) != len(requests):
        raise ValueError("a dispatch's tokens name its requests one for one")
    if all(r.data is None and not r.want and r.write for r in requests):
        return {"cols": [[r.id for r in requests], [r.path for r in requests],
                         [r.ann for r in requests], [r.attempt for r in requests],
                         list(tokens) if tokens is not None else [r.token for r in requests]]}
    if tokens is not None:
        requests = tuple(dataclasses.replace(r, token=t)
                         for r, t in zip(requests, tokens, strict=True))
    return {"reqs": _requests_with_data(requests, frames)}


def _requests_with_data(requests: Sequence[Request], frames: list[Any]) -> list[Any]:
    """Request headers; each upload's bytes appended to `frames`, its header naming the
    frame by its position among the data frames."""
    out = []
    for r in requests:
        fields = _request_fields(r)
        if r.data is not None:
            fields["data"] = len(frames)
            frames.append(r.data)
        out.append(fields)
    if len(frames) > MAX_DATA_FRAMES:
        raise ValueError(f"at most {MAX_DATA_FRAMES} uploads in one message")
    return out


def _results_fields(results: Sequence[Result], arrays: list[Any],
                    ok: OkAnswers | None = None) -> dict[str, Any]:
    """A Results header: its ok answers without a payload as columns ("ok": `ok` as it
    is, else made of `results`), the others one map each ("results"), every areas array
    stacked in one frame (K x 4 x C) that both name rows of."""
    plain: list[Result] = []
    others: list[Result] = []
    for r in results:
        plain_ok = r.status == OK and r.error is None and r.cause is None and r.payload is None
        (plain if plain_ok else others).append(r)
    if any(r.payload is not None for r in others):
        raise ValueError("a result with a payload is sent alone (a Result)")
    rows: list[np.ndarray] = []
    fields: dict[str, Any] = {}
    if ok is not None and plain:
        raise ValueError("a Results with columns carries only other answers one by one")
    if ok is None and plain:
        ok = OkAnswers.of(plain, rows)
    elif ok is not None and ok.areas is not None:
        ok = ok.pick(list(range(len(ok))))          # its frame holds only its own rows
        rows.extend(ok.areas if ok.areas is not None else ())
    if ok is not None:
        fields["ok"] = {"ids": ok.ids, "attempts": ok.attempts, "tokens": ok.tokens,
                        "paths": ok.paths, "masks": ok.masks, "stages": ok.stages,
                        "models": ok.models, "sizes": ok.sizes, "counts": ok.counts,
                        "classes": ok.classes, "pixels": ok.pixels,
                        "name_ids": list(ok.names), "names": list(ok.names.values()),
                        "rows": ok.rows}
    one = []
    for r in others:
        one.append({**_result_fields(r), "areas": None if r.areas is None else len(rows)})
        if r.areas is not None:
            rows.append(r.areas)
    fields["results"] = one
    if rows:                       # one frame: every areas array stacked, K x 4 x C
        if len({a.shape for a in rows}) != 1:
            raise ValueError("the results of one message count the same classes")
        stacked = np.stack(rows)
        fields["arrays"] = [_describe(stacked)]
        arrays.append(stacked)
    else:
        fields["arrays"] = []
    return fields


def _result_fields(r: Result) -> dict[str, Any]:
    return {"id": r.id, "attempt": r.attempt, "status": r.status, "path": r.path,
            "mask": r.mask, "error": r.error, "stage": r.stage, "cause": r.cause,
            "size": None if r.size is None else list(r.size),
            "found": [list(f) for f in r.found], "token": r.token, "model": r.model}


def result_size(r: Result) -> int:
    """About how many header bytes a result takes (a sender keeps a message under
    MAX_HEADER_BYTES by it)."""
    return 128 + sum(len(s) for s in (r.id, r.path, r.mask or "", r.error or "", r.stage,
                                      r.token, r.model)) + sum(24 + len(f[1]) for f in r.found)


def _request_fields(r: Request) -> dict[str, Any]:
    fields = {"id": r.id, "path": r.path, "ann": r.ann, "attempt": r.attempt,
              "token": r.token}
    if r.want or not r.write:         # a path request's header is as it was
        fields |= {"want": r.want, "write": r.write}
    return fields


def _placement_fields(p: Placement) -> list[Any]:
    return [p.orig_h, p.orig_w, p.scale, p.top, p.left, p.height, p.width]


def _describe(a: np.ndarray) -> list[Any]:
    return [a.dtype.name, list(a.shape)]


# ---------------------------------------------------------------------------------------
# documents on a private stream (the acl backend's executor <-> session process)

MAX_DOCUMENT_BYTES = 1 << 20        # one document on such a stream


def pack_document(doc: dict[str, Any]) -> bytes:
    """A small map of plain values for a stream socket (msgpack delimits documents)."""
    return msgpack.packb(doc, use_bin_type=True)


def document_unpacker() -> msgpack.Unpacker:
    """Reads pack_document's maps back from a stream, with the limits `decode` sets: no
    binary or extension values, string keys, a bounded document (a larger one raises
    instead of growing the buffer)."""
    return msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=MAX_DOCUMENT_BYTES,
        max_str_len=MAX_DOCUMENT_BYTES, max_bin_len=0, max_array_len=MAX_IDS,
        max_map_len=64, max_ext_len=0,
    )


# ---------------------------------------------------------------------------------------
# decode


def decode(frames: Sequence[Any], max_submit: int = 4096,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Message:
    """Frames (bytes or zmq.Frame) -> a validated message, or WireError. A placement's
    original size is held to `max_pixels` (the receiving stage's --max-pixels): postprocess
    allocates that many labels, so a claim beyond it costs its frame, not the process."""
    if not frames:
        raise WireError("empty message")
    if len(frames) > MAX_FRAMES:
        raise WireError(f"{len(frames)} frames, at most {MAX_FRAMES}")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes, at most {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_str_len=MAX_HEADER_BYTES,
            max_bin_len=0, max_array_len=max(max_submit, 64), max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if header.get("v") != WIRE_VERSION:
        raise WireError(f"wire version {header.get('v')!r}, this side speaks {WIRE_VERSION}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    request_id = _peek_id(header)
    try:
        msg = _DECODERS[kind](header, frames[1:], max_submit)
    except WireError as exc:
        raise WireError(f"{kind}: {exc}", exc.request_id or request_id) from None
    placement = getattr(msg, "placement", None)
    if placement is not None and placement.orig_h * placement.orig_w > max_pixels:
        raise WireError(f"{kind}: placement claims a {placement.orig_h} x {placement.orig_w} "
                        f"image, over {max_pixels} pixels", request_id)
    return msg


def decode_as(frames: Sequence[Any], kind: type[M],
              max_pixels: int = DEFAULT_MAX_PIXELS) -> M:
    """decode, and refuse any other kind than the one this socket carries."""
    msg = decode(frames, max_pixels=max_pixels)
    if not isinstance(msg, kind):
        raise WireError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg


def _peek_id(header: dict[str, Any]) -> str | None:
    req = header.get("req")
    rid = req.get("id") if isinstance(req, dict) else header.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_STRING_CHARS else None


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    return memoryview(buf)


def _arrays(header: dict[str, Any], frames: Sequence[Any], expect: int) -> list[np.ndarray]:
    specs = header.get("arrays")
    if not isinstance(specs, list) or len(specs) != expect or len(frames) != expect:
        raise WireError(f"expected {expect} array frame(s)")
    out = []
    for spec, frame in zip(specs, frames, strict=True):
        if not (isinstance(spec, list) and len(spec) == 2):
            raise WireError("array spec must be [dtype, shape]")
        dtype, shape = spec
        if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:   # a list: unhashable
            raise WireError(f"array dtype {dtype!r} not allowed")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(_is_int(d) and 1 <= d <= MAX_SIDE_PIXELS for d in shape)):
            raise WireError(f"bad array shape {shape!r}")
        buf = _buffer(frame)
        need = math.prod(shape) * np.dtype(dtype).itemsize
        if buf.nbytes != need:
            raise WireError(f"array frame has {buf.nbytes} bytes, shape needs {need}")
        out.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _string(h: dict[str, Any], key: str, optional: bool = False, empty: bool = False) -> Any:
    value = h.get(key)
    if type(value) is str and 0 < len(value) <= MAX_STRING_CHARS and "\x00" not in value:
        return value                      # the common case, checked at once
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_STRING_CHARS or (not value and not empty):
        raise WireError(f"field {key!r} must be a string of 1..{MAX_STRING_CHARS} characters")
    if "\x00" in value:
        raise WireError(f"field {key!r} contains a NUL byte")
    return value


def _address(h: dict[str, Any], key: str, empty: bool = False) -> str:
    """A ZeroMQ endpoint a worker will connect to: tcp://HOST:PORT or ipc://PATH (empty
    where allowed: none). Anything else would make the connect raise in every worker it
    is handed to."""
    value = _string(h, key, empty=empty)
    if value and (not ADDRESS.fullmatch(value) or value.startswith("tcp://")
                  and not 0 < int(value.rpartition(":")[2]) < 65536):
        raise WireError(f"field {key!r} must be tcp://HOST:PORT or ipc://PATH, not "
                        f"{value[:80]!r}")
    return value


def _int(h: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = h.get(key)
    if not _is_int(value) or not lo <= value <= hi:
        raise WireError(f"field {key!r} must be an integer in [{lo}, {hi}]")
    return value


def _request(h: Any, data: Sequence[Any] = ()) -> Request:
    """A request's header; `data`: the message's data frames, one of which it may name."""
    if not isinstance(h, dict):
        raise WireError("request must be a map")
    want, write, index = h.get("want", ""), h.get("write", True), h.get("data")
    if want not in WANTS or not isinstance(write, bool):
        raise WireError(f"field 'want' must be one of {WANTS[1:]} and 'write' true or false")
    buf = None
    if index is not None:
        if not _is_int(index) or not 0 <= index < len(data):
            raise WireError("field 'data' must name a data frame of the message")
        buf = _buffer(data[index])
        if not buf.nbytes:
            raise WireError("an upload of 0 bytes", h.get("id") if isinstance(
                h.get("id"), str) else None)
    return Request(id=_string(h, "id"), path=_string(h, "path"),
                   ann=_string(h, "ann", optional=True), attempt=_int(h, "attempt", 0, 100),
                   token=_token(h), want=want, write=write, data=buf)


def _requests(reqs: list[Any], frames: Sequence[Any]) -> tuple[Request, ...]:
    """A submit's or dispatch's requests: every data frame named by exactly one."""
    out = tuple(_request(r, frames) for r in reqs)
    named = [r.get("data") for r in reqs if isinstance(r, dict) and r.get("data") is not None]
    if len(set(named)) != len(named) or len(named) != len(frames):
        raise WireError("each data frame belongs to exactly one request")
    return out


def _token(h: dict[str, Any]) -> str:
    token = h.get("token", "")
    if not isinstance(token, str) or len(token) > MAX_NAME_CHARS or not token.isascii():
        raise WireError(f"field 'token' must be a string of at most {MAX_NAME_CHARS} "
                        "ASCII characters")
    return token


def _placement(p: Any) -> Placement:
    if not (isinstance(p, list) and len(p) == 7):
        raise WireError("placement must be 7 numbers")
    orig_h, orig_w, scale, top, left, height, width = p
    ints = (orig_h, orig_w, top, left, height, width)
    if not all(_is_int(v) and 0 <= v <= MAX_PHOTO_SIDE for v in ints):
        raise WireError("placement sizes must be non-negative integers")
    if not isinstance(scale, float | int) or not 0 < scale < 1e6:
        raise WireError("placement scale must be a positive number")
    if min(orig_h, orig_w, height, width) < 1:
        raise WireError("placement sizes must be positive")
    if max(top + height, left + width) > MAX_SIDE_PIXELS:
        raise WireError(f"placement box beyond a {MAX_SIDE_PIXELS}-pixel model input")
    return Placement(orig_h, orig_w, float(scale), top, left, height, width)


def _no_arrays(frames: Sequence[Any]) -> None:
    _arrays({"arrays": []}, frames, 0)


def _name(h: dict[str, Any], key: str, empty: bool = False) -> str:
    """A worker's name (stage-index-pid): short, printable."""
    value = h.get(key)
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or (not value and not empty) \
            or not value.isprintable():
        raise WireError(f"field {key!r} must be a worker name of 1..{MAX_NAME_CHARS} "
                        "printable characters")
    return value


def _decode_dispatch(h: dict[str, Any], frames: Sequence[Any], _: int) -> Dispatch:
    if "cols" in h:
        return Dispatch(_request_columns(h.get("cols"), frames), to=_name(h, "to"),
                        address=_address(h, "address"))
    reqs = h.get("reqs")
    if not isinstance(reqs, list) or not 1 <= len(reqs) <= MAX_IDS:
        raise WireError(f"dispatch carries 1..{MAX_IDS} requests")
    return Dispatch(_requests(reqs, frames), to=_name(h, "to"),
                    address=_address(h, "address"))


def _request_columns(cols: Any, frames: Sequence[Any]) -> tuple[Request, ...]:
    """A dispatch's plain path requests in columns, each column checked at once as
    strictly as `_request` checks one request (no uploads: no data frames)."""
    if not (isinstance(cols, list) and len(cols) == 5
            and all(isinstance(c, list) for c in cols)):
        raise WireError("dispatch 'cols' must be 5 lists: ids, paths, anns, attempts, tokens")
    ids, paths, anns, attempts, tokens = cols
    if not 1 <= len(ids) <= MAX_IDS or {len(c) for c in cols} != {len(ids)}:
        raise WireError(f"dispatch columns carry 1..{MAX_IDS} requests, one row each")
    _no_arrays(frames)
    _text_column("ids", ids, 1, MAX_STRING_CHARS, "dispatch")
    _text_column("paths", paths, 1, MAX_STRING_CHARS, "dispatch")
    _text_column("anns", [a for a in anns if a is not None], 1, MAX_STRING_CHARS, "dispatch")
    _int_column("attempts", attempts, 0, 100, "dispatch")
    _text_column("tokens", tokens, 0, MAX_NAME_CHARS, "dispatch")
    if not "".join(tokens).isascii():
        raise WireError("dispatch column 'tokens' must hold ASCII strings")
    return tuple(map(Request, ids, paths, anns, attempts, tokens))


def _decode_credit(h: dict[str, Any], frames: Sequence[Any], _: int) -> Credit:
    _no_arrays(frames)
    return Credit(credits=_int(h, "credits", 1, MAX_IDS))


def _decode_took(h: dict[str, Any], frames: Sequence[Any], _: int) -> Took:
    _no_arrays(frames)
    return Took(ids=_ids(h, "ids"))


def _decode_handed(h: dict[str, Any], frames: Sequence[Any], _: int) -> Handed:
    _no_arrays(frames)
    return Handed(ids=_ids(h, "ids"), to=_name(h, "to"),
                  took=_ids(h, "took") if "took" in h else ())


def _ids(h: dict[str, Any], key: str) -> tuple[str, ...]:
    ids = h.get(key)
    if not isinstance(ids, list) or len(ids) > MAX_IDS:
        raise WireError(f"field {key!r} must be a list of ids")
    # one pass over the list, not a call per id: a note carries a batch of them
    if not all(type(i) is str and 0 < len(i) <= MAX_STRING_CHARS and "\x00" not in i
               for i in ids):
        for i in ids:                     # which one, and why
            _string({key: i}, key)
    return tuple(ids)


def _decode_image(h: dict[str, Any], frames: Sequence[Any], _: int) -> Image:
    request, placement = _request(h.get("req")), _placement(h.get("place"))
    to = _name(h, "to")
    (pixels,) = _arrays(h, frames, 1)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise WireError("pixels must be uint8 H x W x 3", request.id)
    side_h, side_w = pixels.shape[:2]
    if placement.top + placement.height > side_h or placement.left + placement.width > side_w:
        raise WireError("placement box lies outside the pixels", request.id)
    return Image(request, placement, to, pixels)


def _decode_output(h: dict[str, Any], frames: Sequence[Any], _: int) -> Output:
    request, placement = _request(h.get("req")), _placement(h.get("place"))
    head = h.get("head")
    (data,) = _arrays(h, frames, 1)
    if head == "logits":
        if data.ndim != 3 or data.dtype.kind != "f" or data.shape[0] > MAX_CLASSES:
            raise WireError("logits must be float C x h x w", request.id)
    elif head == "labels":
        if data.ndim != 2 or data.dtype != np.uint8:
            raise WireError("labels must be uint8 H x W", request.id)
    else:
        raise WireError(f"unknown head {head!r}", request.id)
    return Output(request, placement, head, data)


def _decode_results(h: dict[str, Any], frames: Sequence[Any], _: int) -> Results:
    fields = h.get("results")
    if not isinstance(fields, list) or len(fields) > MAX_IDS:
        raise WireError(f"results carries at most {MAX_IDS} answers one by one")
    specs = h.get("arrays")
    if not isinstance(specs, list) or len(specs) > 1:
        raise WireError("results carry at most one array")
    stacked = _arrays(h, frames, len(specs))
    if stacked and (stacked[0].dtype != np.int64 or stacked[0].ndim != 3
                    or stacked[0].shape[1] != 4):
        raise WireError("areas must be int64 K x 4 x C")
    rows = stacked[0] if stacked else np.empty((0, 4, 0), np.int64)
    ok = _ok_answers(h["ok"], rows) if "ok" in h else None
    used: set[int | None] = set()
    if ok is not None:
        used.update(r for r in ok.rows if r >= 0)
    if not fields and ok is None:
        raise WireError("results carries no answer")
    if len(fields) + (0 if ok is None else len(ok)) > MAX_IDS:
        raise WireError(f"results carries at most {MAX_IDS} answers")
    results = []
    for f in fields:
        if not isinstance(f, dict):
            raise WireError("each result is a map")
        row = f.get("areas")
        if row is not None and (not _is_int(row) or not 0 <= row < len(rows) or row in used):
            raise WireError("a result's areas must name a row of the areas frame once",
                            _peek_id(f))
        used.add(row)
        results.append(_result(f, None if row is None else rows[row]))
    if len(used - {None}) != len(rows):
        raise WireError("rows of the areas frame that no result names")
    return Results(tuple(results), ok)


_COLUMNS = ("ids", "attempts", "tokens", "paths", "masks", "stages", "models", "sizes",
            "counts", "classes", "pixels", "name_ids", "names", "rows")
_NONE = type(None)


def _ok_answers(cols: Any, rows: np.ndarray) -> OkAnswers:
    """The columns of a Results' ok answers, checked column by column (C-level passes:
    types, extremes, one join for NUL and ASCII), as strictly as `_result` checks one
    answer; the error names the column."""
    if type(cols) is not dict or set(cols) != set(_COLUMNS):
        raise WireError(f"results 'ok' must be a map of exactly {', '.join(_COLUMNS)}")
    for key in _COLUMNS:
        if type(cols[key]) is not list:
            raise WireError(f"results column {key!r} must be a list")
    ids, attempts, tokens, paths, masks, stages, models, sizes, counts, classes, pixels, \
        name_ids, names, answer_rows = (cols[k] for k in _COLUMNS)
    n = len(ids)
    if not 1 <= n <= MAX_IDS:
        raise WireError(f"results column 'ids' must hold 1..{MAX_IDS} answers")
    for key, column, want in (("attempts", attempts, n), ("tokens", tokens, n),
                              ("paths", paths, n), ("masks", masks, n), ("stages", stages, n),
                              ("models", models, n), ("sizes", sizes, 2 * n),
                              ("counts", counts, n), ("rows", answer_rows, n),
                              ("pixels", pixels, len(classes)),
                              ("names", names, len(name_ids))):
        if len(column) != want:
            raise WireError(f"results column {key!r} holds {len(column)} entries, "
                            f"the answers need {want}")
    _text_column("ids", ids, 1, MAX_STRING_CHARS)
    _text_column("paths", paths, 0, MAX_STRING_CHARS)
    _text_column("stages", stages, 0, MAX_STRING_CHARS)
    _text_column("masks", [m for m in masks if m is not None]
                 if _NONE in set(map(type, masks)) else masks, 1, MAX_STRING_CHARS)
    _text_column("tokens", tokens, 0, MAX_NAME_CHARS)
    if not "".join(tokens).isascii():
        raise WireError("results column 'tokens' must be ASCII")
    _text_column("models", models, 0, MAX_NAME_CHARS)
    if not _HEX.issuperset("".join(models)):
        raise WireError("results column 'models' must be hex digits")
    if set(map(type, itertools.chain(attempts, sizes, counts, classes, pixels,
                                     answer_rows))) != {int}:      # one pass: all ints
        for key, column in (("attempts", attempts), ("sizes", sizes), ("counts", counts),
                            ("classes", classes), ("pixels", pixels), ("rows", answer_rows)):
            if set(map(type, column)) - {int}:                          # which one
                raise WireError(f"results column {key!r} must hold integers")
    _in_range("attempts", attempts, 0, 100)
    _in_range("sizes", sizes, 0, MAX_PHOTO_SIDE)
    if 0 in sizes and any((sizes[i] == 0) != (sizes[i + 1] == 0) for i in range(0, 2 * n, 2)):
        raise WireError("results column 'sizes': a height and width both, or neither")
    _in_range("counts", counts, 0, MAX_CLASSES)
    if sum(counts) != len(classes):
        raise WireError(f"results column 'classes' holds {len(classes)} entries, the counts "
                        f"say {sum(counts)}")
    table = _names_table(name_ids, names)
    if not table.keys() >= set(classes):   # ints (above), each one a named class
        raise WireError("results column 'classes' has a class the 'names' table lacks")
    _in_range("pixels", pixels, 1, 1 << 40)
    _in_range("rows", answer_rows, -1, len(rows) - 1)
    used = [r for r in answer_rows if r >= 0]
    if len(set(used)) != len(used):
        raise WireError("results column 'rows' names a row of the areas frame twice")
    return OkAnswers(ids, attempts, tokens, paths, masks, stages, models, sizes, counts,
                     classes, pixels, table, answer_rows, rows if len(rows) else None)


def _names_table(name_ids: list[Any], names: list[Any]) -> dict[int, str]:
    """A Results' class names table, checked once per distinct table (a model has one;
    a worker sends the same table in each message), not once per message."""
    key = (tuple(name_ids), tuple(names))
    table = _TABLES_SEEN.get(key)
    if table is not None:
        return table
    _int_column("name_ids", name_ids, 0, MAX_CLASSES - 1)
    table = dict(zip(name_ids, names, strict=True))
    if len(table) != len(name_ids):
        raise WireError("results column 'name_ids' names a class twice")
    for name in names:
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_CHARS \
                or not name.isprintable():
            raise WireError(f"results column 'names': a class name is printable, at most "
                            f"{MAX_NAME_CHARS} characters")
    if len(_TABLES_SEEN) >= _TABLES_KEPT:
        _TABLES_SEEN.clear()
    _TABLES_SEEN[key] = table
    return table


_TABLES_SEEN: dict[tuple[tuple[Any, ...], tuple[Any, ...]], dict[int, str]] = {}
_TABLES_KEPT = 256


def _in_range(key: str, column: list[int], lo: int, hi: int,
              message: str = "results") -> None:
    """A column of integers (types checked already) within [lo, hi]."""
    if column and (min(column) < lo or max(column) > hi):
        raise WireError(f"{message} column {key!r} must hold integers in [{lo}, {hi}]")


def _text_column(key: str, column: list[Any], shortest: int, longest: int,
                 message: str = "results") -> None:
    if column and (set(map(type, column)) != {str} or min(map(len, column)) < shortest
                   or max(map(len, column)) > longest or "\x00" in "".join(column)):
        raise WireError(f"{message} column {key!r} must hold strings of {shortest}..{longest} "
                        "characters without NUL")


def _int_column(key: str, column: list[Any], lo: int, hi: int,
                message: str = "results") -> None:
    if column and set(map(type, column)) != {int}:
        raise WireError(f"{message} column {key!r} must hold integers in [{lo}, {hi}]")
    _in_range(key, column, lo, hi, message)


def _decode_result(h: dict[str, Any], frames: Sequence[Any], _: int) -> Result:
    returned = h.get("ret")
    payload = None
    if returned is not None:               # the last frame: what the request wanted back
        if returned not in (WANT_PNG, WANT_LABELS) or not frames:
            raise WireError(f"result returns {returned!r} without its frame")
        payload, frames = _buffer(frames[-1]), frames[:-1]
    result = _decode_result_areas(h, frames)
    if payload is None:
        return result
    if returned == WANT_LABELS and (result.size is None
                                    or payload.nbytes != result.size[0] * result.size[1]):
        raise WireError("returned labels must be height x width bytes", result.id)
    return dataclasses.replace(result, payload=payload, returned=returned)


def _decode_result_areas(h: dict[str, Any], frames: Sequence[Any]) -> Result:
    specs = h.get("arrays")
    n = len(specs) if isinstance(specs, list) else -1
    if n not in (0, 1):
        raise WireError("result carries at most one array")
    areas = None
    if n == 1:
        (areas,) = _arrays(h, frames, 1)
        if areas.dtype != np.int64 or areas.ndim != 2 or areas.shape[0] != 4:
            raise WireError("areas must be int64 4 x C")
    else:
        _arrays(h, frames, 0)
    return _result(h, areas)


def _result(h: dict[str, Any], areas: np.ndarray | None) -> Result:
    """One answer's fields. The front decodes one per image: the common case (an ok answer
    of plain fields) is checked in one expression, the rest field by field (which field,
    and why)."""
    get = h.get
    rid, path, stage, token, attempt = (get("id"), get("path"), get("stage"),
                                        get("token", ""), get("attempt"))
    mask, error, cause, model = get("mask"), get("error"), get("cause"), get("model", "")
    if (type(rid) is str and type(path) is str and type(stage) is str
            and type(token) is str and type(attempt) is int and type(model) is str
            and (mask is None or type(mask) is str) and error is None and cause is None
            and get("status") == OK and 0 < len(rid) <= MAX_STRING_CHARS
            and len(path) <= MAX_STRING_CHARS and len(stage) <= MAX_STRING_CHARS
            and (mask is None or 0 < len(mask) <= MAX_STRING_CHARS)
            and 0 <= attempt <= 100 and len(token) <= MAX_NAME_CHARS and token.isascii()
            and len(model) <= MAX_NAME_CHARS and _HEX.issuperset(model)
            and "\x00" not in rid and "\x00" not in path and "\x00" not in stage
            and (mask is None or "\x00" not in mask)):
        return Result(rid, attempt, OK, path, mask, None, stage, areas, None,
                      _size(get("size")), _found(get("found", [])), token, None, "", model)
    status = get("status")
    if status not in (OK, ERROR):
        raise WireError(f"result status {status!r}")
    if cause is not None and cause not in CAUSES:
        raise WireError(f"result cause {cause!r}")
    size, found = _size(get("size")), _found(get("found", []))
    return Result(id=_string(h, "id"), attempt=_int(h, "attempt", 0, 100), status=status,
                  path=_string(h, "path", empty=True), mask=_string(h, "mask", optional=True),
                  error=_string(h, "error", optional=True), stage=_string(h, "stage", empty=True),
                  areas=areas, cause=cause, size=size, found=found, token=_token(h),
                  model=_version(h))


_HEX = frozenset("0123456789abcdef")


def _size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if type(size) is list and len(size) == 2:
        h, w = size
        if (type(h) is int and type(w) is int and 1 <= h <= MAX_PHOTO_SIDE
                and 1 <= w <= MAX_PHOTO_SIDE):
            return h, w
    raise WireError("result size must be [height, width]")


def _found(found: Any) -> tuple[tuple[int, str, int], ...]:
    """The classes in a mask: [id, name, pixels] each, at most MAX_CLASSES. The front
    decodes one per answer, so the checks are exact types (`type(x) is int` refuses a
    bool) and a class name is checked once (`_NAMES_SEEN`), not once per answer."""
    if type(found) is not list or len(found) > MAX_CLASSES:
        raise WireError(f"result found must be a list of at most {MAX_CLASSES} classes")
    out = []
    for f in found:
        if type(f) is not list or len(f) != 3:
            raise WireError(_FOUND_SHAPE)
        cid, name, pixels = f
        if (type(cid) is not int or not 0 <= cid < MAX_CLASSES or type(pixels) is not int
                or not 0 < pixels <= 1 << 40 or type(name) is not str):
            raise WireError(_FOUND_SHAPE)
        if name not in _NAMES_SEEN:
            if not (0 < len(name) <= MAX_NAME_CHARS and name.isprintable()):
                raise WireError(_FOUND_SHAPE)
            if len(_NAMES_SEEN) >= _NAMES_KEPT:
                _NAMES_SEEN.clear()
            _NAMES_SEEN.add(name)
        out.append((cid, name, pixels))
    return tuple(out)


_FOUND_SHAPE = (f"a found class is [id, name (printable, at most {MAX_NAME_CHARS} "
                "characters), pixels]")
_NAMES_SEEN: set[str] = set()       # class names already checked (a model has a few dozen)
_NAMES_KEPT = 4 * MAX_CLASSES


def _decode_heartbeat(h: dict[str, Any], frames: Sequence[Any], _: int) -> Heartbeat:
    _no_arrays(frames)
    counters = h.get("counters")
    if not isinstance(counters, dict) or len(counters) > MAX_STATS_ENTRIES:
        raise WireError("counters must be a small map")
    for k, v in counters.items():
        if not isinstance(k, str) or len(k) > 64 or not isinstance(v, int | float) \
                or isinstance(v, bool):
            raise WireError("counters map names to numbers")
    stage = h.get("stage")
    if stage not in _STAGE_NAMES:
        raise WireError(f"unknown stage {stage!r}")
    return Heartbeat(stage=Stage(stage), index=_int(h, "index", 0, 4096),
                     pid=_int(h, "pid", 0, 1 << 31), counters=counters,
                     inputs=_address(h, "inputs", empty=True),
                     outputs=_address(h, "outputs", empty=True),
                     capacity=_int(h, "capacity", 0, MAX_IDS), batch=_int(h, "batch", 0, 4096),
                     stuck=_string(h, "stuck", optional=True),
                     fatal=_string(h, "fatal", optional=True), model=_version(h))


def _decode_peers(h: dict[str, Any], frames: Sequence[Any], _: int) -> Peers:
    _no_arrays(frames)
    executors = h.get("executors")
    if not isinstance(executors, list) or len(executors) > MAX_PEERS:
        raise WireError(f"field 'executors' must be a list of at most {MAX_PEERS} peers")
    peers = []
    for e in executors:
        if not (isinstance(e, list) and len(e) == 2):
            raise WireError("a peer is [name, address]")
        peers.append((_name({"name": e[0]}, "name"), _address({"address": e[1]}, "address")))
    return Peers(executors=tuple(peers), credits=_int(h, "credits", 1, MAX_IDS))


def _decode_submit(h: dict[str, Any], frames: Sequence[Any], max_submit: int) -> Submit:
    reqs = h.get("reqs")
    if not isinstance(reqs, list) or not 1 <= len(reqs) <= max_submit:
        raise WireError(f"submit carries 1..{max_submit} requests")
    return Submit(_requests(reqs, frames))


def _decode_status(h: dict[str, Any], frames: Sequence[Any], _: int) -> StatusQuery:
    _no_arrays(frames)
    return StatusQuery()


def _decode_cancel(h: dict[str, Any], frames: Sequence[Any], _: int) -> Cancel:
    _no_arrays(frames)
    return Cancel(ids=_ids(h, "ids"))


def _decode_reload(h: dict[str, Any], frames: Sequence[Any], _: int) -> Reload:
    _no_arrays(frames)
    force = h.get("force", False)
    if not isinstance(force, bool):
        raise WireError("reload force must be true or false")
    return Reload(model=_string(h, "model", empty=True), force=force)


def _version(h: dict[str, Any]) -> str:
    """A model version: "" (absent: none, or an older sender) or a few hex digits."""
    version = h.get("model", "")
    if not (isinstance(version, str) and len(version) <= MAX_NAME_CHARS
            and _HEX.issuperset(version)):
        raise WireError("model version must be hex digits")
    return version


def _decode_reply(h: dict[str, Any], frames: Sequence[Any], _: int) -> Reply:
    _no_arrays(frames)
    ids = h.get("ids")
    body = h.get("body")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise WireError("reply ids must be strings")
    if not isinstance(body, dict):
        raise WireError("reply body must be a map")
    return Reply(status=_string(h, "status"), ids=tuple(ids),
                 message=_string(h, "message", empty=True), body=body)


_DECODERS = {
    DISPATCH: _decode_dispatch, IMAGE: _decode_image, OUTPUT: _decode_output,
    CREDIT: _decode_credit, RESULT: _decode_result, RESULTS: _decode_results,
    TOOK: _decode_took, HANDED: _decode_handed,
    HEARTBEAT: _decode_heartbeat, PEERS: _decode_peers, SUBMIT: _decode_submit,
    STATUS: _decode_status, REPLY: _decode_reply, CANCEL: _decode_cancel,
    RELOAD: _decode_reload,
}
