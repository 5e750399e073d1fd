"""The status document: what `pspnet status` prints, --metrics-json keeps, /metrics shows.

Why typed: the document used to be a dict assembled in two places and read by the
exporter, the client, the bench and the tests, and a counter reached it only if a tuple in
the front named it: one the tuple missed was counted and never shown (the executor's
`stale_dropped` was). Here each figure is a field of its section, declared once with what
it means and the Prometheus family it feeds (`figure`). The document is built from these
classes (`Status.document`), the exporter derives its families from the declarations, and
the front's and the door's counters live in a `Tally` that takes only declared names.

The JSON shape: {"stages": {stage: StageStatus}, "front": FrontStatus, "remote":
[RemoteWorker], "images_per_s": float, "metrics": mIoU summary or null, "daemon":
DaemonStatus (serve only), "plan": how backend, workers and threads were chosen, "ready":
every configured worker up and not draining}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pspnet.core.pipeline import Stage

COUNTER = "counter"      # only grows; a dead worker's share is kept by the front
GAUGE = "gauge"          # a level at the moment of the snapshot


@dataclass(frozen=True)
class Family:
    """A Prometheus family several fields share, told apart by one label."""

    name: str
    doc: str
    label: str


@dataclass(frozen=True)
class Figure:
    """What a field means, and where /metrics shows it."""

    doc: str
    kind: str = COUNTER
    metric: str | Family | None = None     # None: in the document only
    label: str | None = None               # its value of the Family's label
    stage: str | None = None               # per-stage figure shown for this stage only,
                                           # without a stage label


def figure(doc: str, kind: str = COUNTER, metric: str | Family | None = None, *,
           label: str | None = None, stage: str | None = None, default: Any = 0) -> Any:
    """A declared field of the status document (a dataclass field with its Figure)."""
    return field(default=default,
                 metadata={"figure": Figure(doc, kind, metric, label, stage)})


def figures(section: type | object) -> Iterator[tuple[str, Figure]]:
    """(field name, Figure) of every declared figure of a section, in declaration order."""
    for f in dataclasses.fields(section):
        if "figure" in f.metadata:
            yield f.name, f.metadata["figure"]


def counter_names(section: type) -> tuple[str, ...]:
    return tuple(name for name, fig in figures(section) if fig.kind == COUNTER)


class Tally(dict[str, float]):
    """The running counters of one section, by the names it declares. A name it does not
    declare is a KeyError: it would be counted and never shown."""

    def __init__(self, section: type) -> None:
        super().__init__((name, 0) for name, _ in figures(section))
        self.section = section.__name__

    def __setitem__(self, key: str, value: float) -> None:
        if key not in self:
            raise KeyError(f"{key!r} is not a figure of {self.section} (core/status.py)")
        super().__setitem__(key, value)


REQUESTS = Family("pspnet_requests", "Requests by outcome: answered ok, answered with an "
                  "error, refused at the door (bad path, outside --allow-root), cancelled "
                  "by their client while queued", "outcome")


# ---- per stage ---------------------------------------------------------------------------

@dataclass(kw_only=True)
class WorkerFigures:
    """What each worker counts (its heartbeat's counters), summed over a stage."""

    processed: int = figure("Images each stage finished", metric="pspnet_stage_processed")
    errors: int = figure("Images each stage answered with an error",
                         metric="pspnet_stage_errors")
    queue: int = figure("Images waiting inside each stage's processes (the executor: not "
                        "yet in a batch)", GAUGE, "pspnet_stage_queue")
    busy_s: float = figure("Seconds each stage's processes spent working, summed",
                           metric="pspnet_stage_busy_seconds")
    cpu_s: float = figure("CPU seconds each stage's processes used (every thread), summed",
                          metric="pspnet_stage_cpu_seconds")
    batches: int = figure("Batches the executors ran", metric="pspnet_executor_batches",
                          stage=Stage.EXECUTOR)
    filler: int = figure("Empty rows padding partial batches to the built batch size "
                         "each ran at",
                         metric="pspnet_executor_filler_rows", stage=Stage.EXECUTOR)
    stale_dropped: int = figure("Images an executor dropped as meant for its previous life "
                                "(the front had retried them already)",
                                metric="pspnet_executor_stale_dropped", stage=Stage.EXECUTOR)
    forged_dropped: int = figure("Messages a stage dropped as not handed out by the front: "
                                 "pixels or outputs without their request's token, credits "
                                 "from a peer it did not start",
                                 metric="pspnet_stage_forged_dropped")


def summed(counters: list[Mapping[str, float]], past: Mapping[str, float] | None = None,
           ) -> dict[str, float]:
    """Each WorkerFigures figure summed over workers' counters, plus `past` (the share of
    workers that died: counters stay monotonic across restarts)."""
    past = past or {}
    return {name: sum(c.get(name, 0) for c in counters) + past.get(name, 0)
            for name, _ in figures(WorkerFigures)}


@dataclass(kw_only=True)
class StageStatus(WorkerFigures):
    """One stage: its processes as the supervisor sees them, and their counts."""

    processes: int = figure("Worker processes the daemon runs", GAUGE)
    alive: int = figure("Worker processes running", GAUGE, "pspnet_workers_alive")
    up: int = figure("Worker processes heard from since they (re)started: model loaded, "
                     "taking work", GAUGE, "pspnet_workers_up")
    restarts: int = figure("Worker processes restarted by the daemon",
                           metric="pspnet_worker_restarts")
    pids: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class RemoteWorker(WorkerFigures):
    """A worker started elsewhere (`pspnet worker`) that joined the front."""

    stage: str
    index: int
    pid: int
    seen_s_ago: float


# ---- the front and the daemon ------------------------------------------------------------

@dataclass(kw_only=True)
class FrontCounts:
    """The front's running totals (Front.totals is a Tally of these)."""

    submitted: int = figure("Requests accepted", metric="pspnet_requests_accepted")
    ok: int = figure("Requests answered ok", metric=REQUESTS, label="ok")
    errors: int = figure("Requests answered with an error", metric=REQUESTS, label="error")
    retried: int = figure("Requests retried after a worker was lost",
                          metric="pspnet_requests_retried")
    duplicates_dropped: int = figure("Second answers to one request, dropped",
                                     metric="pspnet_duplicate_answers_dropped")
    malformed: int = figure("Messages dropped as malformed, workers' and clients'",
                            metric="pspnet_malformed_messages")
    forged_dropped: int = figure("Messages the front dropped as forged: an identity it did "
                                 "not hand out, an answer without its request's token or "
                                 "from a worker that does not hold the request",
                                 metric="pspnet_forged_messages_dropped")
    abandoned: int = figure("Requests answered with an error because the daemon stopped "
                            "before they finished", metric="pspnet_requests_abandoned")


@dataclass(kw_only=True)
class FrontStatus(FrontCounts):
    queued: int = figure("Accepted, not yet dispatched", GAUGE)
    inflight: int = figure("Dispatched, not yet answered", GAUGE)
    at: dict[str, int] = field(default_factory=dict)     # pending requests by where they are
    cpu_s: float = figure("CPU seconds of the front's process",
                          metric="pspnet_front_cpu_seconds")
    bytes_in: int = figure("Bytes the front received from its workers")
    bytes_out: int = figure("Bytes the front sent to its workers")
    bytes_per_image: float | None = None
    restarts: int = figure("Worker restarts, every stage")


@dataclass(kw_only=True)
class ClientCounts:
    """The door's running totals (Clients.counts is a Tally of these)."""

    busy_replies: int = figure("Submissions answered `busy` (--max-queue full); the client "
                               "retries them", metric="pspnet_busy_replies")
    refused: int = figure("Requests refused at the door", metric=REQUESTS, label="refused")
    cancelled: int = figure("Queued requests their client cancelled (Ctrl-C of pspnet "
                            "submit)", metric=REQUESTS, label="cancelled")
    malformed: int = figure("Client messages dropped as malformed (also in front.malformed)")
    client_errors: int = figure("Client messages that could not be handled (answered with "
                                "an internal error)", metric="pspnet_client_errors")
    uploads: int = figure("Encoded images clients sent instead of paths, accepted")
    upload_busy: int = figure("Uploads answered `busy` (the client's bytes in flight at "
                              "--max-upload-inflight); the client retries them")
    bytes_in: int = figure("Bytes received from clients")
    bytes_out: int = figure("Bytes sent to clients")


@dataclass(kw_only=True)
class DaemonStatus(ClientCounts):
    """`pspnet serve`'s own part; the last three only in the final document (on exit)."""

    pid: int
    endpoint: str
    stopping: bool = False
    watch: str | None = None
    client_connections: int = figure("Client connections open", GAUGE)
    accepting_connections: bool = True
    client_connections_cap: int = figure("About as many client connections as the open "
                                         "files limit allows", GAUGE)
    max_upload_bytes: int = 0        # the largest upload accepted (a client checks first)
    drained: bool | None = None
    abandoned: int | None = None
    failure: str | None = None


@dataclass(kw_only=True)
class Status:
    stages: dict[str, StageStatus]
    front: FrontStatus
    remote: list[RemoteWorker] = field(default_factory=list)
    images_per_s: float = 0.0                  # answered over the last 10 s
    metrics: dict[str, Any] | None = None      # running mIoU, with ground truths
    daemon: DaemonStatus | None = None
    plan: dict[str, Any] | None = None         # how workers and threads were chosen
    ready: bool = False                        # serving: see `readiness`
    model: dict[str, Any] | None = None        # the served model: version, dir; a reload

    def readiness(self) -> str | None:
        """Why this daemon is not ready (None: it is): ready is every configured worker
        up (its model loaded, heard from since it started) and not draining."""
        if self.daemon is not None and self.daemon.stopping:
            return "draining"
        down = [f"{stage} {s.up}/{s.processes} up" for stage, s in self.stages.items()
                if s.up < s.processes]
        return ", ".join(down) or None

    def document(self) -> dict[str, Any]:
        """The JSON document (keys as clients have always read them)."""
        doc = dataclasses.asdict(self)
        if self.daemon is None:
            del doc["daemon"]
        if self.plan is None:
            del doc["plan"]
        if self.model is None:
            del doc["model"]
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> Status:
        """A document read back (a client's); keys this version does not know are left
        out, a missing required one is a ValueError naming it."""
        try:
            daemon = doc.get("daemon")
            return cls(stages={s: _section(StageStatus, v) for s, v in doc["stages"].items()},
                       front=_section(FrontStatus, doc["front"]),
                       remote=[_section(RemoteWorker, r) for r in doc.get("remote") or ()],
                       images_per_s=doc.get("images_per_s", 0.0),
                       metrics=doc.get("metrics"),
                       daemon=None if daemon is None else _section(DaemonStatus, daemon),
                       plan=doc.get("plan"), ready=bool(doc.get("ready", False)),
                       model=doc.get("model"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a status document: {type(exc).__name__}: {exc}") from None


def _section(section: type, values: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(section)}
    return section(**{k: v for k, v in values.items() if k in known})
