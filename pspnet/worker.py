"""`pspnet worker`: one stage process on this host, for a daemon elsewhere (tcp).

Here, above daemon, because it starts a stage process itself rather than talking to the
daemon; it shares serve's pipeline flags so a worker runs what the daemon's own would.
"""

from __future__ import annotations

import argparse
import signal
import socket

from pspnet.core.cli_args import HelpFormatter, host_address, non_negative_int
from pspnet.core.pipeline import PIPELINE
from pspnet.daemon.commands import (
    add_pipeline_args,
    backend_problem,
    pipeline_config,
    usage_error,
)


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser(
        "worker", formatter_class=HelpFormatter,
        help="run one stage process on this host for a daemon elsewhere (tcp)",
        description="Join a daemon started with `--transport tcp` on another host: run one "
                    "preprocess, executor or postprocess process here, connected to that "
                    "daemon's control port. The daemon hands it work like its own children "
                    "and lists it under `remote` in `pspnet status`; it does not restart it "
                    "(run it under systemd or similar). An executor here listens for "
                    "images and hands out outputs on ports of this host (--host), which the "
                    "daemon's other workers connect to. If this worker dies or stays silent "
                    "for --liveness-timeout, the daemon retries what it held elsewhere.",
        epilog="example: pspnet worker executor --front 10.0.0.5 --tcp-base-port 5550 "
               "--keys /etc/pspnet/keys --model models/r50 --backend torch --devices cuda:0 "
               "--index 100")
    worker.add_argument("stage", choices=[spec.stage.value for spec in PIPELINE],
                        help="which stage this process runs: " + "; ".join(
                            f"{spec.stage}: {spec.summary}" for spec in PIPELINE))
    worker.add_argument("--front", required=True, metavar="HOST",
                        help="host name or address of the daemon (its --transport tcp port)")
    worker.add_argument("--host", type=host_address, default=None, metavar="ADDR",
                        help="this host's address that the daemon's workers can reach, for "
                             "an executor's data ports (default: the address this host "
                             "uses to reach --front)")
    worker.add_argument("--index", type=non_negative_int, default=100,
                        help="this worker's number; keep it apart from the daemon's own "
                             "(0..K-1)")
    add_pipeline_args(worker)
    worker.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from pspnet.core.config import Addresses
    from pspnet.core.keys import Keys, KeysError
    from pspnet.core.trust import Trust
    from pspnet.stages.worker import run

    try:
        host = args.host or local_address_towards(args.front, args.tcp_base_port)
    except OSError as exc:
        return usage_error("worker", f"--front {args.front}: {exc.strerror or exc}")
    cfg = pipeline_config(args, transport="tcp", tcp_host=args.front)
    problem = backend_problem(cfg)      # its threads are planned for this host's CPUs
    if problem:
        return usage_error("worker", problem)
    if cfg.keys_dir is None:
        return usage_error("worker", "the daemon admits only workers with its worker key: "
                                     "pass --keys DIR holding worker.key_secret and server.key "
                                     "copied from the daemon's `pspnet keys DIR`")
    try:
        keys = Keys.for_worker(cfg.keys_dir)
    except KeysError as exc:
        return usage_error("worker", f"--keys: {exc}")
    signal.signal(signal.SIGINT, signal.SIG_DFL)      # Ctrl-C ends it, quietly
    addrs = Addresses(f"tcp://{args.front}:{args.tcp_base_port}", host, None)
    run(args.stage, args.index, cfg, addrs, Trust(keys.token_secret()), keys,
        supervised=False)
    return 0


def local_address_towards(front: str, port: int) -> str:
    """The address of this host's interface that routes to `front` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((front, port))
        return probe.getsockname()[0]
