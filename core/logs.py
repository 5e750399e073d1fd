"""structlog set-up, called once at the start of every process."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog


def configure_logging(level: str = "info", json: bool | None = None, **bind: object) -> None:
    """JSON lines on stderr (readable console lines when stderr is a TTY, or json=False).

    Every process of the daemon shares one stderr, so each record goes out in one write
    call, newline included (structlog's PrintLogger writes the newline separately, and
    under PYTHONUNBUFFERED each is its own write(2): another process's line could land
    between them). A line under PIPE_BUF (4 KiB) then stays whole.
    """
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if json:
        processors += [_finite_floats, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if bind:
        structlog.contextvars.bind_contextvars(**bind)


def json_safe(doc: object) -> object:
    """NaN and infinities (an mIoU with no class seen) -> null: standard JSON has neither."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if isinstance(doc, dict):
        return {k: json_safe(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [json_safe(v) for v in doc]
    return doc


def _finite_floats(_logger: Any, _method: str,
                   event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: json_safe on every value, so the JSON renderer never writes NaN."""
    return {k: json_safe(v) for k, v in event_dict.items()}


class _CurrentStderr:
    """The stderr of the moment, looked up on each write: a stream swapped in after
    configure_logging (a test's capture, a redirect) is the one written to, and a closed
    one left behind is never written to again."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
