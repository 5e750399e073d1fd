"""`pspnet serve --metrics-port P`: the daemon's figures for Prometheus at /metrics, and
the probes: /healthz (alive: 200 unless the loop stopped handing over status) and /readyz
(200 when ready: every worker up, not draining; 503 otherwise); any other path is 404.

Why a snapshot: prometheus_client answers scrapes on a thread of its own, while the
front's state belongs to the daemon's loop. The loop hands over a copy of the status
document (the one `pspnet status` prints) at most every REFRESH_S, and a scrape reads only
that copy and the latency histogram (which is thread-safe). So a scrape never touches
the front, and its figures are at most REFRESH_S old.

Which figures become which families is declared once, beside each figure, in
core/status.py; a new counter there is a new metric here without an edit. Counters stay
monotonic across worker restarts (the front keeps a dead worker's counts); rates over a
window (busy fraction, batch fill) are computed here from the snapshots of the last
WINDOW_S.

Why its own HTTP server (prometheus_client's WSGI app under a capped one): each open
connection holds a descriptor and a thread, and the descriptors are the front's one budget
(daemon/fd_budget.py). So at most MAX_CONNECTIONS are served at once, none while the budget
has no room, and a connection silent for IDLE_TIMEOUT_S is closed; one past either is
closed at once and logged (rate-limited). A flood of idle connections costs scrapes for a
while, never the daemon.
"""

from __future__ import annotations

import collections
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pspnet.core.pipeline import Stage
from pspnet.core.status import COUNTER, Family, Figure, StageStatus, Status, figures
from pspnet.daemon.fd_budget import FdBudget

REFRESH_S = 0.5                 # the loop copies the status document at most this often
WINDOW_S = 10.0                 # busy fraction and batch fill: over the last WINDOW_S
STALE_S = 10.0                  # no snapshot this long once serving: the loop is stuck
# accept-to-answer, seconds: from a few ms (a small model, idle) to minutes (a backlog)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0, 300.0)
MAX_CONNECTIONS = 16            # /metrics connections served at once (a scraper needs one)
IDLE_TIMEOUT_S = 5.0            # a connection that sends nothing this long is closed


class Exporter:
    """Serves /metrics when given a port; without one every method does nothing."""

    def __init__(self, port: int | None, host: str = "127.0.0.1",
                 budget: FdBudget | None = None) -> None:
        """`budget`: the front's descriptors (None: only the connection cap applies)."""
        self.port, self.host, self.budget = port, host, budget
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "pspnet_request_latency_seconds",
            "Accepted to answered, per request, by outcome (ok or error)",
            ["outcome"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.snapshots = Snapshots()
        self.registry.register(StatusCollector(self.snapshots))
        self._next_refresh = 0.0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def listen(self) -> str | None:
        """Bind the port (before any worker starts); why not, as one line, or None."""
        if self.port is None:
            return None
        try:
            self._server = make_server(
                self.host, self.port, probes_app(make_wsgi_app(self.registry), self.snapshots),
                _server_class(self.host), handler_class=_QuietHandler)
        except OSError as exc:
            return (f"--metrics-port {self.port}: cannot listen on {self.host}:{self.port}: "
                    f"{exc.strerror or exc}")
        self._server.budget = self.budget
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()
        return None

    @property
    def address(self) -> str | None:
        """http://HOST:PORT/metrics once listening (the port the system chose for 0)."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def answered(self, status: str, stage: str, latency_s: float) -> None:
        """The front's hook: one request answered, `latency_s` after it was accepted."""
        if self.port is not None:
            self.latency.labels("ok" if status == "ok" else "error").observe(latency_s)

    def refresh(self, status: Callable[[], Status]) -> None:
        """From the daemon's loop: a new snapshot if the last is REFRESH_S old."""
        if self._server is None:
            return
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_S
            self.snapshots.add(now, status())

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)


def probes_app(metrics: Callable, snapshots: Snapshots) -> Callable:
    """/metrics, /healthz and /readyz; 404 for anything else (a probe of a wrong path must
    fail, not read 200 from the metrics)."""
    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            code, text = snapshots.alive()
        elif path == "/readyz":
            code, text = snapshots.ready()
        else:
            code, text = 404, f"no {path}: /metrics, /healthz or /readyz"
        body = (text + "\n").encode()
        start_response({200: "200 OK", 404: "404 Not Found",
                        503: "503 Service Unavailable"}[code],
                       [("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body)))])
        return [body]
    return app


class CappedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them, none past the budget."""

    daemon_threads = True
    request_queue_size = 64              # queued by the kernel, no descriptor until accepted
    budget: FdBudget | None = None

    def server_activate(self) -> None:
        super().server_activate()
        self.active = 0
        self.active_lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.active_lock:
            room = self.budget.room() if self.budget is not None else 1
            if self.active < MAX_CONNECTIONS and room > 0:
                self.active += 1
                return True
        if self.budget is not None:      # closed at once by the caller (shutdown_request)
            self.budget.refused("metrics", connections=self.active, cap=MAX_CONNECTIONS)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except Exception:                # no thread for it (none left): its slot back
            with self.active_lock:
                self.active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.active_lock:
                self.active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that timed out or went away: its connection is closed, nothing printed."""


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S             # each read from the peer; then the connection closes

    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


def _server_class(host: str) -> type[CappedServer]:
    """CappedServer for the host's address family (IPv6 for "::1")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return type("CappedServer", (CappedServer,), {"address_family": family})


class Snapshots:
    """The latest status and those of the last WINDOW_S, shared with scrapes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recent: collections.deque[tuple[float, Status]] = collections.deque()

    def add(self, now: float, status: Status) -> None:
        with self.lock:
            self.recent.append((now, status))
            while len(self.recent) > 2 and self.recent[1][0] <= now - WINDOW_S:
                self.recent.popleft()

    def alive(self) -> tuple[int, str]:
        """/healthz: 200 while starting and while the loop hands over status; 503 once it
        has not for STALE_S (a stuck loop: restart it)."""
        with self.lock:
            last = self.recent[-1][0] if self.recent else None
        if last is not None and time.monotonic() - last > STALE_S:
            return 503, f"no status from the daemon's loop for {time.monotonic() - last:.0f} s"
        return 200, "alive" if last is not None else "alive, starting"

    def ready(self) -> tuple[int, str]:
        """/readyz: 200 when the latest status is ready (and fresh), 503 saying why not."""
        code, why = self.alive()
        window = self.window()
        if window is None:
            return 503, "not ready: starting"
        status = window[1][1]
        if code != 200:
            return 503, f"not ready: {why}"
        if not status.ready:
            return 503, f"not ready: {status.readiness() or 'starting'}"
        return 200, "ready"

    def window(self) -> tuple[tuple[float, Status], tuple[float, Status]] | None:
        """(oldest, latest) of the window; None before the first snapshot."""
        with self.lock:
            if not self.recent:
                return None
            return self.recent[0], self.recent[-1]


class StatusCollector:
    """Turns the status document into Prometheus families at each scrape: every figure
    core/status.py declares with a metric, then the few computed here."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    def describe(self) -> list[Metric]:
        return []                         # unknown until the first snapshot: no checks

    def collect(self) -> Iterator[Metric]:
        window = self.snapshots.window()
        if window is None:
            return
        (then, old), (now, status) = window
        yield from declared(status)
        in_state = GaugeMetricFamily(
            "pspnet_queue_depth", "Accepted requests not yet answered, by where they are: "
            "queued in the front (not yet dispatched) or inside a stage", labels=["state"])
        for state, count in status.front.at.items():
            in_state.add_metric([state], count)
        yield in_state
        busy = GaugeMetricFamily(
            "pspnet_stage_busy_ratio", f"Busy time over wall time per process, last "
            f"{WINDOW_S:g} s (1.0: every process of the stage always working)",
            labels=["stage"])
        for stage in status.stages:
            busy.add_metric([stage], _busy_ratio(old, status, stage, now - then))
        yield busy
        yield GaugeMetricFamily(
            "pspnet_batch_fill_ratio", f"Images over rows of the batches run in the last "
            f"{WINDOW_S:g} s (1.0: every batch full; NaN: no batch ran)",
            value=_fill_ratio(old.stages.get(Stage.EXECUTOR), status.stages.get(Stage.EXECUTOR)))
        yield GaugeMetricFamily("pspnet_images_per_second", "Requests answered per second "
                                "over the last 10 s", value=status.images_per_s)
        if status.metrics:
            yield GaugeMetricFamily("pspnet_miou_percent", "Running mIoU of the requests "
                                    "that came with a ground truth",
                                    value=status.metrics["mIoU"])
        if status.model:                    # live reloads (daemon.reload)
            yield from _model_metrics(status.model)


def _model_metrics(model: dict[str, Any]) -> Iterator[Metric]:
    """The served model's version (an info-style gauge: 1 for the one served) and the
    reloads so far: switched, failed while loading, refused at once."""
    served = GaugeMetricFamily("pspnet_model_info", "The model served (its manifest's "
                               "digest and directory); a reload changes it",
                               labels=["version", "dir"])
    served.add_metric([str(model.get("version")), str(model.get("dir"))], 1)
    yield served
    reloads = CounterMetricFamily("pspnet_reloads", "Live model reloads, by outcome",
                                  labels=["outcome"])
    reloads.add_metric(["switched"], model.get("reloads", 0))
    reloads.add_metric(["failed"], model.get("failed_reloads", 0))
    reloads.add_metric(["refused"], model.get("refused_reloads", 0))
    yield reloads


def declared(status: Status) -> Iterator[Metric]:
    """One family per metric that core/status.py declares, with every figure that feeds it:
    the front's and the daemon's by their Family label, the stages' by stage."""
    families: dict[str, Metric] = {}

    def add(fig: Figure, value: float, labels: dict[str, str]) -> None:
        name, doc = fig.metric, fig.doc
        if isinstance(fig.metric, Family):
            name, doc = fig.metric.name, fig.metric.doc
            labels = {fig.metric.label: fig.label, **labels}
        if name not in families:
            kind = CounterMetricFamily if fig.kind == COUNTER else GaugeMetricFamily
            families[name] = kind(name, doc, labels=list(labels))
        families[name].add_metric(list(labels.values()), value)

    for section in (status.front, status.daemon):
        for name, fig in figures(section) if section is not None else ():
            if fig.metric is not None:
                add(fig, getattr(section, name), {})
    for stage, stage_status in status.stages.items():
        for name, fig in figures(stage_status):
            if fig.metric is not None and fig.stage in (None, stage):
                add(fig, getattr(stage_status, name), {} if fig.stage else {"stage": stage})
    return iter(families.values())


def _busy_ratio(old: Status, new: Status, stage: str, span_s: float) -> float:
    processes = new.stages[stage].processes
    if span_s <= 0 or not processes:
        return math.nan
    before = old.stages[stage].busy_s if stage in old.stages else 0.0
    return max(0.0, new.stages[stage].busy_s - before) / (span_s * processes)


def _fill_ratio(old: StageStatus | None, new: StageStatus | None) -> float:
    if new is None:
        return math.nan
    images = new.processed - (old.processed if old else 0)
    filler = new.filler - (old.filler if old else 0)
    return images / (images + filler) if images + filler > 0 else math.nan
