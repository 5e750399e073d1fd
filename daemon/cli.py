"""`pspnet`: one entry point, one subcommand per job. Heavy imports happen per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.logs import json_safe  # also for server/eval: status and JSON files

EPILOG = """\
commands in the order a new user meets them:
  pspnet demo                       the embedded default, end to end (small model, sample photos)
  pspnet build --config ... --out models/   mmseg config + checkpoint -> ONNX/torch artifacts
  pspnet serve --model models/ --out masks/ the daemon (Ctrl-C drains and stops it)
  pspnet submit a.jpg b.jpg         send images to the running daemon, one JSON line each
  pspnet status                     what the daemon is doing
  pspnet eval --voc VOC2012 --model models/     the seed's mIoU table
  pspnet bench --model models/ --synthetic 64   throughput per batch size
Run `pspnet COMMAND --help` for each command's flags."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pspnet",
        description="Streaming PSPNet segmentation: build models, serve them, feed and measure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from build_model.cli import add_build_parser
    from daemon.commands import add_daemon_parsers

    add_build_parser(sub)
    add_daemon_parsers(sub)
    for extra in ("bench.cli", "daemon.demo"):
        try:
            module = __import__(extra, fromlist=["add_parsers"])
        except ImportError:
            continue
        module.add_parsers(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def print_json(doc: object) -> None:
    sys.stdout.write(json.dumps(json_safe(doc), default=str) + "\n")
    sys.stdout.flush()


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


if __name__ == "__main__":
    sys.exit(main())
