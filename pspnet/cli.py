"""`pspnet`: one entry point, one subcommand per job. Heavy imports happen per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from pspnet.batch.cli import add_parsers as add_batch_parsers
from pspnet.bench.cli import add_parsers as add_bench_parsers
from pspnet.build_model.cli import add_build_parser
from pspnet.core.exits import EXIT_BROKEN_PIPE
from pspnet.daemon.commands import add_daemon_parsers
from pspnet.demo import add_parsers as add_demo_parser
from pspnet.worker import add_worker_parser

EPILOG = """\
commands in the order a new user meets them:
  pspnet demo                       a trained model end to end on sample photos, with pictures
  pspnet build --config ... --out models/   mmseg config + checkpoint -> ONNX/torch artifacts
  pspnet serve --model models/ --out masks/ the daemon (Ctrl-C drains and stops it)
  pspnet submit photos/ -r          send images to the running daemon, a line per image
  pspnet status                     what the daemon is doing
  pspnet reload --model models/v2   swap the daemon's model live (SIGHUP: the same one again)
  pspnet eval --voc VOC2012 --model models/     the seed's mIoU table
  pspnet bench --model models/ --synthetic 64   throughput per batch size
  pspnet batch --images DIR --model models/     many images on Ray Data (one machine or a cluster)
Run `pspnet COMMAND --help` for each command's flags."""


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags (also how deploy/'s command lines are checked offline)."""
    parser = argparse.ArgumentParser(
        prog="pspnet",
        description="Streaming PSPNet segmentation: build models, serve them, feed and measure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(sub)                   # listed in the order a new user meets them
    add_build_parser(sub)
    add_daemon_parsers(sub)                # serve, submit, status, reload, keys
    add_batch_parsers(sub)                 # eval, batch
    add_bench_parsers(sub)                 # bench
    add_worker_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()                 # inside: a reader gone at the last line counts
    except BrokenPipeError:                # `pspnet submit ... | head -1`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (exit's flush)
        return EXIT_BROKEN_PIPE
    return code
