"""argparse pieces every `pspnet` command shares: value types, the help formatter, the
up-front output check. Here, below daemon, bench and build_model, so each can use them
without importing another.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pspnet.core.config import output_problem


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each flag, unless its help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: 0 or less would stall a stage or mean 'use the default' silently."""
    return _checked(text, int, "an integer >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _checked(text, int, "an integer >= 0", lambda v: v >= 0)


def non_negative_float(text: str) -> float:
    return _checked(text, float, "a number >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _checked(text, float, "a number > 0", lambda v: v > 0)


def base_port(text: str) -> int:
    """argparse type: the front's internal tcp control port."""
    return _checked(text, int, "a port from 1 to 65535", lambda v: 1 <= v <= 65535)


def host_address(text: str) -> str:
    """argparse type: an IPv4 address the internal ports can be bound on and connected to
    (not 0.0.0.0: this host's own children connect to the same address)."""
    import ipaddress

    return str(_checked(text, ipaddress.IPv4Address,
                        "an IPv4 address of this host, e.g. 10.0.0.5 (not 0.0.0.0)",
                        lambda a: not (a.is_unspecified or a.is_multicast)))


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key.strip(), value.strip()


def device_list(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices:
        raise argparse.ArgumentTypeError("expected at least one device, e.g. cpu or cuda:0")
    return devices


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


def _checked(text: str, kind: type, wanted: str, ok: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, not {text!r}") from None
    if not ok(value):                      # comparisons with nan are false: refused too
        raise argparse.ArgumentTypeError(f"expected {wanted}, not {text!r}")
    return value


def outputs_problem(*outputs: tuple[str, Path | None, bool]) -> str | None:
    """'FLAG: why' for the first (flag, path, is a directory) that cannot take this run's
    output, found before any work; None when all can (a None path is not asked for)."""
    for flag, path, directory in outputs:
        problem = path is not None and output_problem(path, directory=directory)
        if problem:
            return f"{flag}: {problem}"
    return None
