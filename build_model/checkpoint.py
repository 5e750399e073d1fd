"""Read an mmseg checkpoint safely and load it into the network, saying what did not fit.

Nothing here logs before the checks pass, so a user error is the only line the CLI prints.

Checkpoints are pickles: by default they are read with `torch.load(weights_only=True)`,
which cannot run code; one that needs full unpickling is refused unless the user passes
`--trust-checkpoint`. Accepts the official layout `{"meta": ..., "state_dict": ...}` and a
bare state_dict.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pspnet.build_model.errors import BuildError

CONV_SEG_WEIGHT = "decode_head.conv_seg.weight"
DROPPED_PREFIXES = ("auxiliary_head.",)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sha256: str


@dataclass(frozen=True)
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)   # expected-unexpected: aux head


def read_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Load the file (weights only unless `trust`) and find its state_dict."""
    path = Path(path)
    check_checkpoint_path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust:
            raise BuildError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
        raise BuildError(f"checkpoint {path} holds objects that need full unpickling (which "
                         "can run code); rerun with --trust-checkpoint if you trust its "
                         "source") from exc
    except Exception as exc:
        raise BuildError(f"cannot read checkpoint {path} (is it a PyTorch .pth file?): "
                         f"{type(exc).__name__}: {_first_line(exc)}") from exc
    state_dict, meta = _split(obj, path)
    return Checkpoint(state_dict=state_dict, meta=meta, sha256=sha256_file(path))


def check_checkpoint_path(path: str | Path) -> None:
    """Refuse a missing path or a directory before the config and mmseg load."""
    path = Path(path)
    if path.is_dir():
        raise BuildError(f"checkpoint {path} is a directory; name the .pth file")
    if not path.is_file():
        raise BuildError(f"checkpoint file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive, or (legacy format) a pickle from protocol 2 on
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise BuildError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip "
                         "archive nor a pickle); name the .pth file")


def describe(path: Path, checkpoint: Checkpoint) -> str:
    """One progress line about a checkpoint that was read."""
    return (f"read checkpoint {path} ({len(checkpoint.state_dict)} tensors, "
            f"sha256 {checkpoint.sha256[:12]}...)")


def load_into(model: nn.Module, checkpoint: Checkpoint) -> LoadReport:
    """Copy the weights into `model` (non-strict) after checking shapes; report the rest.

    A conv_seg of another shape means a checkpoint for another number of classes: an error
    naming both counts. Other shape mismatches are errors too (wrong architecture).
    """
    state = checkpoint.state_dict
    own = model.state_dict()
    _check_classes(own, state)
    bad = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise BuildError(f"checkpoint does not fit this config: {len(bad)} tensors differ in "
                         f"shape, e.g. {bad[0]} {tuple(state[bad[0]].shape)} vs "
                         f"{tuple(own[bad[0]].shape)}")
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    dropped = [k for k in unexpected if k.startswith(DROPPED_PREFIXES)]
    report = LoadReport(missing=list(result.missing_keys),
                        unexpected=[k for k in unexpected if k not in dropped],
                        dropped=dropped)
    return report


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise BuildError(f"{path} is not an mmseg checkpoint (no state_dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    return state, meta if isinstance(meta, dict) else {}


def _check_classes(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    if CONV_SEG_WEIGHT not in state or CONV_SEG_WEIGHT not in own:
        return
    theirs, ours = state[CONV_SEG_WEIGHT].shape[0], own[CONV_SEG_WEIGHT].shape[0]
    if theirs != ours:
        raise BuildError(f"checkpoint is for {theirs} classes ({CONV_SEG_WEIGHT} has shape "
                         f"{tuple(state[CONV_SEG_WEIGHT].shape)}) but the config has {ours}")


def log_report(report: LoadReport) -> None:
    """Progress lines: dropped auxiliary tensors, and warnings for anything else odd."""
    if report.dropped:
        _log.info("dropped %d auxiliary-head tensors (inference does not use them)",
                  len(report.dropped))
    if report.unexpected:
        _log.warning("%d unexpected tensors ignored: %s", len(report.unexpected),
                     _sample(report.unexpected))
    if report.missing:
        _log.warning("%d tensors missing from the checkpoint (left at random init): %s",
                     len(report.missing), _sample(report.missing))
    if not report.missing and not report.unexpected:
        _log.info("all network tensors loaded")


def _sample(keys: list[str], limit: int = 5) -> str:
    more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
