"""Issue 14's harness (studies/front_compare.py): the parts that decide its figures, checked
without running two benches (that takes minutes; bench/README.md shows a real run)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from studies import front_compare as fc

# two sockets as iproute2 6.1's `ss -tinHe` prints them (first line, then the info line)
SS_TEXT = """\
ESTAB 0      0      127.0.0.1:27152 127.0.0.1:33356 ino:48579 sk:2 cgroup:/ <->
\t ts sack bbr wscale:10,10 rto:204 mss:65483 cwnd:17 bytes_sent:6002007 \
bytes_acked:6002007 bytes_received:92 segs_out:114 segs_in:32 data_segs_out:112
ESTAB 0      0      127.0.0.1:33356 127.0.0.1:27152 ino:47740 sk:6 cgroup:/ <->
\t ts sack bbr wscale:10,10 rto:208 mss:32768 cwnd:13 bytes_sent:92 bytes_acked:93 \
bytes_received:6002007 segs_out:32 segs_in:115
TIME-WAIT 0 0 127.0.0.1:40000 127.0.0.1:27150 timer:(timewait,59sec,0) ino:0 sk:9
"""


def test_parse_ss_reads_each_sockets_counters_by_inode():
    parsed = fc.parse_ss(SS_TEXT)
    assert set(parsed) == {48579, 47740}           # ino:0 (no owner) is left out
    front = parsed[48579]
    assert front["local"] == "127.0.0.1:27152" and front["peer"] == "127.0.0.1:33356"
    assert (front["bytes_acked"], front["bytes_received"]) == (6002007, 92)
    assert parsed[47740]["bytes_received"] == 6002007


def test_e2e_images_counts_warmup_and_every_repeat():
    doc = {"settings": {"warmup_batches": 2, "repeats": 3},
           "results": [{"batch_size": 16, "images_per_pass": 512},
                       {"batch_size": 64, "images_per_pass": 96}]}
    # bs16: 32 warm-up + 3 x 512; bs64: warm-up capped at one pass (96) + 3 x 96
    assert fc.e2e_images(doc) == 32 + 1536 + 96 + 288
    doc["results"][0]["e2e_images"] = 1000         # a bench that counts them itself wins
    assert fc.e2e_images(doc) == 1000 + 96 + 288


def test_bench_entry_prefers_the_pspnet_package(tmp_path):
    (tmp_path / "daemon").mkdir()
    (tmp_path / "daemon" / "cli.py").write_text("")
    assert fc.bench_entry(tmp_path) == ["-m", "daemon.cli", "bench"]
    (tmp_path / "pspnet").mkdir()
    (tmp_path / "pspnet" / "__main__.py").write_text("")
    assert fc.bench_entry(tmp_path) == ["-m", "pspnet", "bench"]
    with pytest.raises(fc.HarnessError, match="not a pspnet-daemon tree"):
        fc.bench_entry(tmp_path / "nothing")


def test_payload_per_image_from_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(
        '{"input_size": [500, 500], "head": "logits", "num_classes": 21, '
        '"logits_size": [63, 63]}')
    assert fc.payload_per_image(tmp_path) == {
        "input": 750_000, "output": 21 * 63 * 63 * 4, "total": 750_000 + 333_396}


@pytest.mark.skipif(shutil.which("ss") is None or not os.path.isdir("/proc/self/fd"),
                    reason="needs iproute2's ss and /proc")
def test_front_bytes_counts_what_this_process_sends_and_receives():
    """The sampler's real path: a loopback connection in this process, 3 MB one way and
    1 MB back; the counters of this process's end must show both, and nothing of the
    peer's end (owned by the same process here, so both ends are seen: in + out twice)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    listen_port = str(server.getsockname()[1])
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    received = bytearray()

    def drain(sock: socket.socket, size: int) -> None:
        while len(received) < size:
            received.extend(sock.recv(1 << 20))

    with fc.FrontBytes(os.getpid(), 0.05) as sampler:
        reader = threading.Thread(target=drain, args=(accepted, 3_000_000))
        reader.start()
        client.sendall(b"x" * 3_000_000)
        reader.join()
        accepted.sendall(b"y" * 1_000_000)
        got = 0
        while got < 1_000_000:
            got += len(client.recv(1 << 20))
        time.sleep(0.3)                            # a few samples after the last byte
    for sock in (client, accepted, server):
        sock.close()
    totals = sampler.totals()
    assert sampler.samples >= 3
    # both ends belong to this process: each byte counted once sent, once received;
    # bytes_acked of the connecting end also counts its SYN (one byte)
    assert totals["rx"] == 4_000_000
    assert 4_000_000 <= totals["tx"] <= 4_000_000 + totals["sockets"]
    ports = totals["by_local_port"]
    assert ports[listen_port] == {"sockets": 1, "rx": 3_000_000, "tx": 1_000_000}


def test_goals_judge_the_new_tree_against_the_old():
    def side(cpu: float, kb: float, ratio: float) -> dict[str, float]:
        return {"front_cpu_ms_per_image": cpu, "front_bytes_per_image": kb * 1024,
                "e2e_over_executor": ratio}

    rows = [{"config": "1exe-bs16", "executors": 1, "batch_size": 16,
             "old": side(1.2, 2118, 0.95), "new": side(0.3, 1.5, 0.96)},
            {"config": "2exe-bs16", "executors": 2, "batch_size": 16,
             "old": side(1.1, 2118, 1.40), "new": side(0.31, 1.5, 1.30)}]
    verdict = fc.goals(rows, tolerance=0.05)
    assert verdict["front_bytes_below_2KB"] and verdict["front_cpu_lower_everywhere"]
    assert verdict["front_cpu_flat_1_to_2_executors"]          # 0.31 / 0.30
    assert not verdict["e2e_over_executor_not_lower"]           # 1.30 / 1.40 = 0.93
    rows[1]["new"]["front_bytes_per_image"] = 2048
    assert not fc.goals(rows, tolerance=0.05)["front_bytes_below_2KB"]
