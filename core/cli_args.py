"""argparse pieces every `pspnet` command shares: value types, the help formatter, and the
flags of the config dataclasses.

Why flags are declared on the dataclass fields (`setting`): a setting's default and help
were written once in argparse and again on the dataclass, and drifted. Now the field owns
both; `add_flags` writes the flags a command picks (its own help text or a hidden flag
given there, not by editing argparse's actions) and `from_args` builds the config back,
typed. Here, below daemon, bench and build_model, so each can use them without importing
another.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
FLAG = "flag"                   # the key of a field's Flag in its metadata


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each flag, unless its help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or action.nargs == 0 or text == argparse.SUPPRESS
                or default in (None, False, [], {}, (), argparse.SUPPRESS)):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


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


def metrics_port(text: str) -> int:
    """argparse type: a tcp port, or 0 for one the system chooses."""
    return 0 if text.strip() == "0" else base_port(text)


def ip_address(text: str) -> str:
    """argparse type: an IPv4 or IPv6 address to listen on (0.0.0.0: every interface)."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address, not {text!r}") from None


LOG_FORMATS = {"auto": None, "json": True, "console": False}   # -> log_json


def log_format(text: str) -> bool | None:
    """argparse type: auto | json | console -> log_json (None: JSON unless on a TTY)."""
    if text not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_FORMATS)}, "
                                         f"not {text!r}")
    return LOG_FORMATS[text]


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


# ---- flags declared on config fields ---------------------------------------------------

@dataclass(frozen=True)
class Flag:
    """How one config field is written on the command line; its default is the field's."""

    name: str                                   # e.g. "--max-wait-ms"
    help: str
    type: Callable[[str], Any] | None = None    # text -> the field's value, checked
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    action: str | type[argparse.Action] | None = None
    required: bool = False


def setting(default: Any = dataclasses.MISSING, *, flag: str, help: str,
            default_factory: Any = dataclasses.MISSING, **how: Any) -> Any:
    """A dataclass field with its flag: `x: int = setting(2, flag="--x", help="...")`."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={FLAG: Flag(flag, help, **how)})


def flag_names(config: type) -> tuple[str, ...]:
    """The fields of `config` that have a flag, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(config) if FLAG in f.metadata)


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type,
              names: Iterable[str], *, help: Mapping[str, str] | None = None,
              hidden: Iterable[str] = ()) -> None:
    """Write the flags of `config`'s fields `names` (in that order): dest is the field's
    name, the default the field's; `help` replaces a text for this command, `hidden`
    flags are accepted but not listed."""
    declared = {f.name: f for f in dataclasses.fields(config)}
    help, hidden = dict(help or {}), set(hidden)
    for name in names:
        spec = declared[name]
        flag: Flag = spec.metadata[FLAG]
        kwargs: dict[str, Any] = {
            "dest": name, "help": argparse.SUPPRESS if name in hidden else
            help.get(name, flag.help)}
        if flag.required:
            kwargs["required"] = True
        elif spec.default is not dataclasses.MISSING:
            kwargs["default"] = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            kwargs["default"] = spec.default_factory()
        else:
            kwargs["default"] = None            # the caller gives it to from_args
        if flag.action is not None:
            kwargs["action"] = flag.action
        for key in ("type", "choices", "metavar"):
            if getattr(flag, key) is not None:
                kwargs[key] = getattr(flag, key)
        parser.add_argument(flag.name, **kwargs)


def from_args(config: type[T], args: argparse.Namespace, **given: Any) -> T:
    """`config` from every field `args` has (a flag's dest is its field's name), with
    `given` for the rest or instead."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
              if f.init and f.name not in given and hasattr(args, f.name)}
    return config(**values, **given)


class CollectPairs(argparse.Action):
    """A repeatable KEY=VALUE flag into one dict (a key given again: the last wins)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 value: Any, option_string: str | None = None) -> None:
        key, text = value
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: text})


class CollectTuple(argparse.Action):
    """A repeatable flag into one tuple, in order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 value: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, (*(getattr(namespace, self.dest) or ()), value))
