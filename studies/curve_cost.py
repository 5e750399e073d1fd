"""What CurveZMQ costs the daemon's tcp planes, measured on ZeroMQ alone.

Every tcp socket of the daemon speaks CURVE (docs/security.md), and since the daemon has no
way to turn it off, this study measures the transport itself: one process PUSHes frames to
another over tcp loopback, with and without CURVE, the frame sizes the daemon sends (a
500 x 500 letterboxed image, 750 KB, from preprocess to executor; a 21 x 63 x 63 float32
logits output, 333 KB, from executor to postprocess; a 300-byte control note to the front).
CPU seconds of both ends over the messages give the cost per message; the rate says how
many one pair of processes can move.

  python -m studies.curve_cost [--seconds 3] [--json bench/results/cpu-2core-curve-cost.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time

import zmq

SIZES = {"pixels 500x500x3": 750_000, "logits 21x63x63": 333_396, "control note": 300}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _receiver(port: int, keys: tuple[bytes, bytes] | None, count: int, out: mp.Queue) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)                                  # PULL: frames in
    if keys is not None:
        pull.curve_server = True
        pull.curve_publickey, pull.curve_secretkey = keys
    pull.bind(f"tcp://127.0.0.1:{port}")
    out.put("bound")
    first = None
    cpu0 = _cpu_s()
    for i in range(count):
        pull.recv(copy=False)
        if i == 0:
            first, cpu0 = time.perf_counter(), _cpu_s()
    out.put((time.perf_counter() - first, _cpu_s() - cpu0))
    ctx.destroy(linger=0)


def _sender(port: int, server_public: bytes | None, size: int, count: int,
            out: mp.Queue) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)                                  # PUSH: frames out
    push.sndhwm = 64
    if server_public is not None:
        push.curve_serverkey = server_public
        push.curve_publickey, push.curve_secretkey = zmq.curve_keypair()
    push.connect(f"tcp://127.0.0.1:{port}")
    payload = os.urandom(size)
    cpu0 = _cpu_s()
    for _ in range(count):
        push.send(payload, copy=False)
    out.put(_cpu_s() - cpu0)
    ctx.destroy(linger=-1)


def measure(size: int, curve: bool, seconds: float, port: int) -> dict[str, float]:
    """One run: messages/s and CPU ms per message on both ends."""
    count = max(200, int(seconds * (2e9 / max(size, 20_000))))  # about `seconds` at 2 GB/s
    keys = zmq.curve_keypair() if curve else None
    out_r, out_s = mp.Queue(), mp.Queue()
    receiver = mp.Process(target=_receiver, args=(port, keys, count, out_r))
    receiver.start()
    out_r.get(timeout=10)
    sender = mp.Process(target=_sender,
                        args=(port, keys[0] if keys else None, size, count, out_s))
    sender.start()
    wall_s, recv_cpu = out_r.get(timeout=600)
    send_cpu = out_s.get(timeout=60)
    sender.join()
    receiver.join()
    n = count - 1
    return {"messages": n, "messages_per_s": round(n / wall_s, 1),
            "MB_per_s": round(n * size / wall_s / 1e6, 1),
            "send_cpu_ms_per_msg": round(send_cpu * 1e3 / count, 4),
            "recv_cpu_ms_per_msg": round(recv_cpu * 1e3 / n, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="about this long per run")
    parser.add_argument("--port", type=int, default=5790)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows = []
    for name, size in SIZES.items():
        plain = measure(size, False, args.seconds, args.port)
        curve = measure(size, True, args.seconds, args.port + 1)
        cpu_plain = plain["send_cpu_ms_per_msg"] + plain["recv_cpu_ms_per_msg"]
        cpu_curve = curve["send_cpu_ms_per_msg"] + curve["recv_cpu_ms_per_msg"]
        rows.append({"frame": name, "bytes": size, "plain": plain, "curve": curve,
                     "extra_cpu_ms_per_msg": round(cpu_curve - cpu_plain, 4),
                     "rate_ratio": round(curve["messages_per_s"] / plain["messages_per_s"], 3)})
        print(f"{name:18s} plain {plain['messages_per_s']:>9,.0f}/s "
              f"{cpu_plain:.4f} ms CPU   curve {curve['messages_per_s']:>9,.0f}/s "
              f"{cpu_curve:.4f} ms CPU   (+{cpu_curve - cpu_plain:.4f} ms per message, "
              f"rate x{rows[-1]['rate_ratio']})")
    if args.json:
        doc = {"study": "curve_cost", "machine": platform.node(), "cpus": os.cpu_count(),
               "load_avg": os.getloadavg(), "pyzmq": zmq.__version__,
               "libzmq": zmq.zmq_version(), "has_curve": zmq.has("curve"), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
