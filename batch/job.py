"""What a `pspnet batch` job runs and where, and the flags of its own settings.

Apart from ray_batch (which imports the stage functions, and with them torch) so that the
CLI writes these flags without that import. The settings it shares with the daemon
(model, backend, precision, batch size, options, masks, pixel limit) take their flags from
PipelineConfig's declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pspnet.core.cli_args import positive_float, positive_int, setting
from pspnet.core.config import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class BatchJob:
    """What to run and where: everything the tasks and actors need, picklable."""

    model_dir: Path
    batch_size: int
    backend: str = "ort"
    device: str = setting("cpu", flag="--device", choices=("cpu", "cuda"),
                          help="cuda: each executor actor asks Ray for one GPU")
    precision: str = "fp32"
    backend_options: Mapping[str, str] = field(default_factory=dict)
    out_dir: Path | None = None                 # masks; None: none written
    max_pixels: int = DEFAULT_MAX_PIXELS
    executors: int = setting(
        0, flag="--executors", type=positive_int, metavar="N",
        help="executor actors, at most (Ray starts one and adds more while they are the "
             "bottleneck; default: the cluster's GPUs with --device cuda, else 1)")
    executor_cpus: float = setting(
        1.0, flag="--executor-cpus", type=positive_float, metavar="N",
        help="CPUs each executor actor reserves; its backend runs as many threads")
    address: str | None = setting(
        None, flag="--address", metavar="ADDR",
        help="join the Ray cluster at ADDR (auto, HOST:PORT, ray://HOST:10001); default: "
             "RAY_ADDRESS if set, else a local Ray instance")
    num_cpus: int | None = setting(
        None, flag="--num-cpus", type=positive_int, metavar="N",
        help="CPUs of the local Ray instance (default: all of this machine)")
