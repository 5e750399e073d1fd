"""The stages of the pipeline, named once, in the order an image goes through them.

Why one table: a stage's name used to be spelled in about ten places (tuples in the
supervisor and the worker entry points, a regex in the front, literals in the exporter and
the CLI), so adding a stage touched eleven files. Everything that iterates over stages (the
supervisor's slots, a worker's dispatch to its main loop, `pspnet worker`'s choices, the
status document, the exporter) reads `PIPELINE`; a stage is a `Stage`, compared as itself.
A literal table, not a registry: nothing registers itself at import time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Stage(enum.StrEnum):
    """A stage of the pipeline; its value is its name on the wire, in logs and status."""

    PREPROCESS = "preprocess"
    EXECUTOR = "executor"
    POSTPROCESS = "postprocess"


@dataclass(frozen=True)
class StageSpec:
    """What the rest of the program needs to know of a stage."""

    stage: Stage
    module: str                                   # whose `main(child)` runs its worker
    workers: Callable[[Any], int]   # how many of them the front supervises, from the
                                    # PipelineConfig (not imported: core.config imports
                                    # core.wire, which names the stages from here)
    summary: str                                  # for help texts


PIPELINE: tuple[StageSpec, ...] = (
    StageSpec(Stage.PREPROCESS, "pspnet.stages.preprocess",
              lambda cfg: cfg.preprocess_workers or 0,
              "decode and letterbox images, pixels straight to an executor"),
    StageSpec(Stage.EXECUTOR, "pspnet.stages.executor", lambda cfg: len(cfg.devices),
              "run the model on one device in static batches"),
    StageSpec(Stage.POSTPROCESS, "pspnet.stages.postprocess",
              lambda cfg: cfg.postprocess_workers or 0,
              "outputs to masks and IoU areas"),
)
STAGES: tuple[Stage, ...] = tuple(spec.stage for spec in PIPELINE)


def spec_of(stage: Stage) -> StageSpec:
    return next(spec for spec in PIPELINE if spec.stage == stage)


def first_index(stage: Stage, cfg: Any) -> int:
    """The first worker index of `stage` in the config's generation: a live reload runs
    two generations at once, on indices (and so ipc data paths) of their own; they take
    turns between the two ranges."""
    return (cfg.generation % 2) * spec_of(stage).workers(cfg)
