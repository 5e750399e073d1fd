"""What `pspnet serve` adds to the pipeline's config: the client endpoint, watch mode,
queue, drain, metrics. Apart from the server so that the CLI writes these flags without
importing the daemon's loop (ZeroMQ, numpy) for `pspnet --help`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pspnet.core.cli_args import (
    CollectTuple,
    ip_address,
    metrics_port,
    non_negative_float,
    positive_int,
    setting,
)
from pspnet.core.config import PipelineConfig

DEFAULT_MAX_INFLIGHT_BYTES = 256 << 20   # one client's uploads accepted, not answered


@dataclass(frozen=True)
class ServeConfig:
    pipeline: PipelineConfig
    endpoint: str = setting(
        flag="--endpoint",
        help="where clients connect: ipc://PATH or tcp://HOST:PORT (default: ipc socket in "
             "a private 0700 runtime dir, which submit and status find by themselves; env "
             "PSPNET_ENDPOINT overrides)")
    watch: Path | None = setting(
        None, flag="--watch", type=Path, metavar="DIR",
        help="also process images already in DIR and each one that lands there later (DIR's "
             "own files, not its subfolders': the log names each subfolder skipped); a "
             "record next to the masks makes restarts neither lose nor redo images")
    max_queue: int = setting(
        1024, flag="--max-queue", type=positive_int,
        help="requests accepted but not answered; beyond it clients are told `busy` and "
             "slow down")
    max_upload_inflight: int = setting(
        DEFAULT_MAX_INFLIGHT_BYTES, flag="--max-upload-inflight", type=positive_int,
        metavar="BYTES",
        help="bytes of uploaded images one client may have accepted and not yet answered; "
             "beyond it its uploads are told `busy` and wait (all clients: 4 x this)")
    drain_timeout_s: float = setting(
        120.0, flag="--drain-timeout", type=non_negative_float, metavar="S",
        help="on SIGTERM, wait at most this long for accepted requests; then answer the "
             "rest with an error and exit 1")
    metrics_json: Path | None = setting(
        None, flag="--metrics-json", type=Path, metavar="FILE",
        help="write the final status (counts, mIoU) here on exit")
    allow_roots: tuple[Path, ...] = setting(
        flag="--allow-root", type=Path, action=CollectTuple, metavar="DIR",
        default_factory=tuple,
        help="only read images and ground truths under DIR (repeatable); required when "
             "--endpoint is reachable from other hosts")
    metrics_port: int | None = setting(
        None, flag="--metrics-port", type=metrics_port, metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (requests by outcome, "
             "accept-to-answer latency, queue depth, batch fill, busy fraction per stage, "
             "restarts, images/s); 0: a free port, logged in the `serving` line")
    metrics_host: str = setting(
        "127.0.0.1", flag="--metrics-host", type=ip_address, metavar="ADDR",
        help="the address /metrics listens on; 0.0.0.0 in a container, for a scraper in "
             "another pod (the figures name no paths)")
