"""Issue 23 item 4: the /metrics HTTP server draws from the front's one descriptor budget.

The attack: idle TCP connections to --metrics-port, more than the daemon's descriptor
limit, held open, then a client submits. Before the budget (513dc9e): at a limit of 256,
221 idle connections and one `pspnet submit` made the front abort inside ZeroMQ ("Too many
open files (src/ipc_listener.cpp:297)", SIGABRT) and every worker went with it (989 at
1,024). Now the metrics server serves at most MAX_CONNECTIONS at once, refuses (and logs)
the rest, closes idle ones, and the daemon lives on.
"""

from __future__ import annotations

import resource
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pspnet.daemon.exporter import IDLE_TIMEOUT_S
from pspnet.daemon.fd_budget import REFUSED_LOG_EVERY_S
from tests.kit import fd_count, submit_all

ARGS = ("--batch-size", "4", "--preprocess-workers", "1", "--postprocess-workers", "1",
        "--metrics-port", "0")
EXTRA_CONNECTIONS = 64          # beyond the daemon's limit
SCRAPE_BACK_S = IDLE_TIMEOUT_S + 10.0   # liveness bound: idle connections closed, a scrape


@pytest.fixture
def own_fd_limit_raised() -> Iterator[int]:
    """This process holds over a thousand connections: soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024 + EXTRA_CONNECTIONS + 256:
        pytest.skip(f"the hard RLIMIT_NOFILE ({hard}) is too low for the attacker")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def hold_idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections to the port that never send a byte (those that cannot connect
    within a second are skipped: the attacker does not care)."""
    held = []
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:
            continue
    return held


def scrape_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 and b"pspnet_requests_total" in response.read()
    except OSError:
        return False


@pytest.mark.usefixtures("own_fd_limit_raised")
@pytest.mark.parametrize("limit", [256, 1024])
def test_idle_metrics_connections_beyond_the_descriptor_limit(limit, tiny_models, photo_files,
                                                              tmp_path, daemons):
    """soft = hard = `limit` for the daemon (it cannot raise it); `limit` + 64 idle
    connections to its /metrics port, held: the daemon stays up, a client's 12 images are
    answered ok while they are held, the refusals are logged (rate-limited: a few lines, not
    one per connection), a scrape succeeds again once the idle ones time out, and the
    daemon drains and exits 0."""
    daemon = daemons(tiny_models["logits"], tmp_path / "masks", tmp_path, *ARGS,
                     nofile=(limit, limit))
    daemon.wait_ready()
    (serving,) = [e for e in daemon.events() if e.get("event") == "serving"]
    url = serving["metrics"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    idle_fds = fd_count(daemon.proc.pid)
    started = time.monotonic()
    held = hold_idle_connections(port, limit + EXTRA_CONNECTIONS)
    made_s = time.monotonic() - started
    try:
        peak_fds = fd_count(daemon.proc.pid)
        answers, took_s = submit_all(daemon.endpoint, photo_files[:12], timeout_s=60)
        assert daemon.proc.poll() is None, f"daemon exited\n{daemon.tail()}"
        assert [a.status for a in answers] == ["ok"] * 12, [a.error for a in answers][:3]
        deadline = time.monotonic() + SCRAPE_BACK_S
        while not scrape_ok(url):
            assert time.monotonic() < deadline, (
                f"no scrape within {SCRAPE_BACK_S:.0f} s with idle connections held\n"
                f"{daemon.tail()}")
            time.sleep(0.5)
        print(f"\nFIGURE metrics fd attack (soft = hard = {limit}): {len(held)} idle "
              f"connections held (made in {made_s:.1f} s); front fds idle {idle_fds}, "
              f"{peak_fds} after the flood; 12 images ok in {took_s:.1f} s; scraped meanwhile")
    finally:
        for sock in held:
            sock.close()
    refusals = [e for e in daemon.events() if e.get("event", "").startswith(
        "connection refused") and e.get("listener") == "metrics"]
    assert refusals, "no refused connection was logged"
    most = 2 + (time.monotonic() - started) / REFUSED_LOG_EVERY_S
    assert len(refusals) <= most, f"{len(refusals)} lines: the refusals are not rate-limited"
    assert peak_fds is not None and peak_fds < limit
    assert daemon.stop() == 0, daemon.tail()
