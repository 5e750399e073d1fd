"""`pspnet`: one entry point, one subcommand per job. Heavy imports happen per subcommand."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pspnet",
        description="Streaming PSPNet segmentation: build models, serve them, feed and measure.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from build_model.cli import add_build_parser

    add_build_parser(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
