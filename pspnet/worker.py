"""`pspnet worker`: one stage process on this host, for a daemon elsewhere (tcp).

Here, above daemon, because it starts a stage process itself rather than talking to the
daemon; it shares serve's pipeline flags so a worker runs what the daemon's own would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon.commands import add_pipeline_args, pipeline_config
from stages.cli_args import HelpFormatter, non_negative_int


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser(
        "worker", formatter_class=HelpFormatter,
        help="run one stage process on this host for a daemon elsewhere (tcp)",
        description="Join a daemon started with `--transport tcp` on another host: run one "
                    "preprocess, executor or postprocess process here, connected to that "
                    "daemon's internal ports. The daemon hands it work like its own children "
                    "and lists it under `remote` in `pspnet status`; it does not restart it "
                    "(run it under systemd or similar). Requests it holds when it dies are "
                    "retried after the daemon's stall timeout.",
        epilog="example: pspnet worker executor --front 10.0.0.5 --tcp-base-port 5550 "
               "--model models/r50 --backend torch --devices cuda:0 --index 100")
    worker.add_argument("stage", choices=("preprocess", "executor", "postprocess"),
                        help="which stage this process runs")
    worker.add_argument("--front", required=True, metavar="HOST",
                        help="host name or address of the daemon (its --transport tcp ports)")
    worker.add_argument("--index", type=non_negative_int, default=100,
                        help="this worker's number; keep it apart from the daemon's own "
                             "(0..K-1)")
    add_pipeline_args(worker)
    worker.set_defaults(run=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from stages import executor, postprocess, preprocess
    from stages.config import Addresses

    cfg = replace(pipeline_config(args), transport="tcp", tcp_host=args.front)
    addrs = Addresses.for_config(cfg, Path("."))
    stage_main = {"preprocess": preprocess.main, "executor": executor.main,
                  "postprocess": postprocess.main}[args.stage]
    stage_main(cfg, addrs, args.index, supervised=False)
    return 0
