"""Live model reload: a new model beside the running one, then the switch, without a
request lost or a second of not serving.

nginx and gunicorn are the model: `pspnet reload [--model DIR]` or SIGHUP (the same
directory, read again). The front starts a second generation of workers with the new
model, on indices and ipc paths of their own; the running generation serves on. Each
stage follows the model (preprocess its input size, postprocess its classes, palette and
`align_corners`): a model of another geometry gets all three stages anew; one of the same
geometry and classes (new weights, other batch sizes) only new executors, the running
preprocess and postprocess workers serving both models, then the new one (`kept`). Each
new executor runs one batch before it reports (the config's `first_batch_check`), so
"heard from" means loaded and able to run. Once every new worker has reported, new
batches are routed to the new generation only (`Roster.active`) and the client that
asked is answered; the old generation finishes what the ledger says it holds, then is
retired (stopped, never restarted). A new model that cannot start (a missing or broken
directory, a backend that cannot open it, a first batch that fails, no report within the
start-up timeout) fails the reload with the worker's reason: its workers are stopped and
the old model serves on. At most two models run at once: a reload asked while the
previous one's old model still finishes its requests waits for it to be gone (one waits;
another is refused), one asked while a new model loads is refused. Every answer names its
model's version (the digest of its manifest, `model.manifest.model_version`), stamped by
the front from the generation of the executor that ran it, never taken from a worker's
word.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pspnet.core import wire
from pspnet.core.config import PipelineConfig, start_document
from pspnet.core.pipeline import Stage
from pspnet.model.artefacts import model_dir_problem
from pspnet.model.manifest import Manifest, model_version, pick_batch_size
from pspnet.model.metrics import IoUAccumulator

LOADING, DRAINING, RETIRING, FAILED = "loading", "draining", "retiring", "failed"
SHAREABLE = (Stage.PREPROCESS, Stage.POSTPROCESS)   # kept for a model of the same geometry
SIGHUP_ORIGIN = "SIGHUP"       # a reload asked by signal: its outcome is logged only


@dataclass(frozen=True)
class Generation:
    """One model as the front serves it: its workers' config and what it answers with."""

    number: int
    cfg: PipelineConfig
    manifest: Manifest
    version: str

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "dir": str(self.cfg.model_dir),
                "generation": self.number, "batch_size": self.cfg.batch_size,
                "input_size": list(self.manifest.input_size),
                "classes": self.manifest.num_classes}


@dataclass
class Swap:
    """One reload in progress."""

    old: Generation
    new: Generation
    origin: Any                    # the client's identity (bytes), or SIGHUP_ORIGIN
    started: float
    kept: tuple[Stage, ...] = ()   # the running workers' stages that serve the new model
    state: str = LOADING
    switched: float | None = None  # when new requests began to go to the new model
    why: str | None = None         # FAILED: the reason


class Reloader:
    def __init__(self, front: Any) -> None:
        """`front`: the Front (its supervisor, roster, ledger, metrics and gate are used
        once it has started)."""
        self.front = front
        self.log = structlog.get_logger().bind(component="reload")
        cfg = front.cfg
        self.active = Generation(cfg.generation, cfg, front.manifest,
                                 model_version(cfg.model_dir))
        self.versions = {self.active.number: self.active.version}   # generation -> version
        self.swap: Swap | None = None
        self.queued: tuple[Generation, Any, bool, tuple] | None = None   # waits for it
        self.replies: list[tuple[Any, wire.Reply]] = []
        self.reloads = self.failures = 0
        self.refused = 0                # asked and refused at once, with the reason
        self.last: dict[str, Any] | None = None

    def stamp(self, sender: str, entry: Any) -> tuple[bool, str, int]:
        """For an answer from `sender`: whether it is a worker the front knows, the version
        of the model that ran the request (its executor's, else the sender's), and how
        many classes the sender's model has (its areas' width)."""
        by_name = self.front.roster.workers.by_name
        worker = by_name.get(sender)
        generation = None if worker is None else worker.generation
        ran = by_name.get(entry.executor or "")
        model = self.version_of(ran.generation if ran is not None else generation)
        return (worker is not None, model,
                self.classes(generation) or self.front.metrics.areas.shape[-1])

    def version_of(self, generation: int | None) -> str:
        """The version of the model a generation serves ("" none: not one of ours)."""
        return self.versions.get(generation, "")

    def classes(self, generation: int | None) -> int | None:
        """How many classes the model of a generation has (None: not one of ours)."""
        swap = self.swap
        for gen in (self.active, *((swap.old, swap.new) if swap is not None else ())):
            if gen.number == generation:
                return gen.manifest.num_classes
        return None

    # ---- asking ------------------------------------------------------------------------

    def request(self, model_dir: str | Path | None, force: bool, origin: Any) -> str | None:
        """Start a reload to `model_dir` (None or "": the served directory, read again).
        None: started, the outcome comes as a reply for `origin`; else why not (the
        running model serves on), counted as refused."""
        problem = self._start_or_why(model_dir, force, origin)
        return None if problem is None else self.refuse(problem)

    def refuse(self, problem: str) -> str:
        """Count a reload refused at once (here, or at the door: a directory outside
        --allow-root, a daemon draining); the status shows them apart from images."""
        self.refused += 1
        return problem

    def _start_or_why(self, model_dir: str | Path | None, force: bool, origin: Any,
                      ) -> str | None:
        swap = self.swap
        if swap is not None and (swap.state == LOADING or self.queued is not None):
            return (f"a reload to {swap.new.cfg.model_dir} is in progress ({swap.state})"
                    f"{' and another waits' if self.queued else ''}; at most two models run "
                    "at once: reload again once it is done (`pspnet status` shows it)")
        directory = Path(model_dir) if model_dir else self.active.cfg.model_dir
        not_a_model = model_dir_problem(directory)     # a checkpoint, an ONNX file...
        if not_a_model is not None:
            return f"cannot reload: {not_a_model}; the running model {self.active.version} " \
                   "serves on"
        try:
            manifest = Manifest.read(directory)
            version = model_version(directory)
            batch = _batch_size(manifest, self.active.cfg.batch_size)
            _check_artefacts(directory, self.active.cfg)
        except (OSError, ValueError) as exc:
            return (f"cannot reload {directory}: {exc}; the running model "
                    f"{self.active.version} serves on")
        problem = classes_problem(self.active.manifest, manifest)
        if problem and not force:
            return (f"{directory} {problem}: refused, the running model "
                    f"{self.active.version} serves on; pass --force to serve it anyway "
                    "(answers then name other classes, and the running mIoU restarts)")
        cfg = dataclasses.replace(self.active.cfg, model_dir=directory, batch_size=batch,
                                  first_batch_check=True)
        new = Generation(-1, cfg, manifest, version)        # numbered when it starts
        kept = SHAREABLE if same_geometry(self.active.manifest, manifest) else ()
        if swap is not None:            # the old model still finishing: started after it
            self.queued = (new, origin, bool(problem), kept)
            self.log.info("reload: waits until the replaced model has finished",
                          model=str(directory), version=version, asked_by=_who(origin))
        else:
            self._start(new, origin, bool(problem), kept)
        return None

    def _start(self, new: Generation, origin: Any, forced: bool,
               kept: tuple[Stage, ...]) -> None:
        """Its workers started beside the running model's; the generation after the
        active one (the two that run at once take turns between two index ranges)."""
        number = self.active.number + 1
        new = dataclasses.replace(new, number=number,
                                  cfg=dataclasses.replace(new.cfg, generation=number))
        front = self.front
        self.versions[new.number] = new.version
        if kept:                        # the running preprocess/postprocess serve it too
            front.roster.feeds[new.number] = self.active.number
        front.supervisor.add_generation(new.cfg, start_document(
            new.cfg, front.addrs, front.gate.trust, front.gate.curve),
            (Stage.EXECUTOR,) if kept else None)
        self.swap = Swap(self.active, new, origin, time.monotonic(), kept)
        self.log.info("reload: starting the new model beside the running one",
                      model=str(new.cfg.model_dir), version=new.version,
                      running=self.active.version, batch_size=new.cfg.batch_size,
                      asked_by=_who(origin), force=forced,
                      new_workers="executors" if kept else "every stage")

    # ---- each supervision pass ---------------------------------------------------------

    def step(self, now: float) -> None:
        """Move a reload on: switch once the new model's workers have all reported (or
        fail it), retire the old once it holds nothing, finish once it is gone."""
        swap = self.swap
        if swap is None:
            return
        sup = self.front.supervisor
        if swap.state == LOADING:
            failure = sup.trial_failures.pop(swap.new.number, None)
            if failure is not None:
                self._fail(swap, failure)
            elif all(s.heard is not None for s in sup.of(swap.new.number)):
                self._switch(swap, now)
        if swap.state == DRAINING and not self._holds(swap.old, swap.kept):
            self._retire_old(swap)
            swap.state = RETIRING
        gone = swap.new if swap.state == FAILED else swap.old
        if swap.state in (RETIRING, FAILED) and not sup.of(gone.number):
            self.versions.pop(gone.number, None)
            self.swap = None
            self.log.info("reload done" if swap.state == RETIRING else "reload abandoned",
                          serving=self.active.version, model=str(self.active.cfg.model_dir),
                          took_s=round(now - swap.started, 2))
            if self.queued is not None:
                new, origin, forced, kept = self.queued
                self.queued = None
                self._start(new, origin, forced, kept)

    def _retire_old(self, swap: Swap) -> None:
        """The old model's workers stopped for good; those of kept stages serve the new
        model from now on (its generation, its start document when restarted)."""
        front, old, new = self.front, swap.old.number, swap.new.number
        front.supervisor.retire(old, f"model {swap.old.version} replaced by "
                                     f"{swap.new.version}",
                                None if not swap.kept else (Stage.EXECUTOR,))
        if swap.kept:
            front.supervisor.adopt(old, new, swap.kept)
            for worker in front.roster.workers:
                if worker.generation == old and worker.stage in swap.kept:
                    worker.generation = new
            front.roster.feeds.pop(new, None)
            front.roster.send_peers(front.roster.workers.of(Stage.POSTPROCESS))

    def stop(self, reason: str) -> None:
        """The daemon stops: a model still loading is given up (its workers stopped) and
        whoever asked for it, or for one waiting, is told why."""
        if self.queued is not None:
            self._reply(self.queued[1], wire.Reply("error", message=f"no reload: {reason}"))
            self.queued = None
        if self.swap is not None and self.swap.state == LOADING:
            self._fail(self.swap, reason, f"no reload: {reason}")

    def _switch(self, swap: Swap, now: float) -> None:
        front, new, old = self.front, swap.new, swap.old
        front.supervisor.trial = None
        front.roster.active = new.number
        front.manifest = new.manifest
        if new.manifest.num_classes != old.manifest.num_classes:    # --force: other classes
            self.log.warning("running mIoU restarted: the new model has other classes",
                             classes=new.manifest.num_classes,
                             images_before=front.metrics.images)
            front.metrics = front.answers.metrics = IoUAccumulator(new.manifest.num_classes)
        self.active = new
        swap.state, swap.switched = DRAINING, now
        self.reloads += 1
        load_s = round(now - swap.started, 2)
        self.last = {"ok": True, "version": new.version, "previous": old.version,
                     "dir": str(new.cfg.model_dir), "load_s": load_s}
        self.log.info("reload: new requests go to the new model; the old one finishes what "
                      "it holds", version=new.version, previous=old.version, load_s=load_s,
                      pending=front.ledger.pending)
        self._reply(swap.origin, wire.Reply("reloaded", body={
            "model": str(new.cfg.model_dir), "version": new.version,
            "previous": old.version, "previous_model": str(old.cfg.model_dir),
            "load_s": load_s, "batch_size": new.cfg.batch_size}))

    def _fail(self, swap: Swap, why: str, message: str | None = None) -> None:
        sup = self.front.supervisor
        sup.trial = None
        sup.retire(swap.new.number, f"reload to {swap.new.version} failed")
        self.front.roster.feeds.pop(swap.new.number, None)
        swap.state, swap.why = FAILED, why
        self.failures += 1
        self.last = {"ok": False, "version": swap.new.version, "error": why,
                     "dir": str(swap.new.cfg.model_dir)}
        self.log.error("reload failed; the running model serves on", error=why,
                       model=str(swap.new.cfg.model_dir), serving=self.active.version)
        self._reply(swap.origin, wire.Reply("error", message=message or (
            f"the new model {swap.new.cfg.model_dir} failed: {why}; the running model "
            f"{self.active.version} serves on (fix the model directory, e.g. build it "
            "again with `pspnet build`, and reload)")))

    def _holds(self, old: Generation, kept: tuple[Stage, ...]) -> bool:
        """Whether any pending request is held by, or bound for, the old model's workers
        (but those of kept stages, which serve on)."""
        names = {s.name for s in self.front.supervisor.of(old.number)
                 if s.name and s.stage not in kept}
        names |= {w.name for w in self.front.roster.workers
                  if w.generation == old.number and w.stage not in kept}
        return any(e.executor in names or names.intersection(e.holders)
                   for e in self.front.ledger.entries.values())

    def _reply(self, origin: Any, reply: wire.Reply) -> None:
        if origin != SIGHUP_ORIGIN:
            self.replies.append((origin, reply))

    def on_sighup(self, stopping: bool) -> None:
        """SIGHUP: the served model directory, read again and swapped in live."""
        if stopping:
            self.log.warning("SIGHUP while draining: no reload")
            return
        problem = self.request(None, False, SIGHUP_ORIGIN)
        if problem is not None:
            self.log.error("SIGHUP: no reload", error=problem)

    def take_replies(self) -> list[tuple[Any, wire.Reply]]:
        replies, self.replies = self.replies, []
        return replies

    # ---- status ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The status document's `model` section."""
        doc = self.active.describe() | {"reloads": self.reloads,
                                         "failed_reloads": self.failures,
                                         "refused_reloads": self.refused,
                                         "last_reload": self.last, "reload": None}
        if self.swap is not None:
            doc["reload"] = {"state": self.swap.state, "to": self.swap.new.version,
                             "dir": str(self.swap.new.cfg.model_dir),
                             "new_workers": "executors" if self.swap.kept else "every stage",
                             "running_s": round(time.monotonic() - self.swap.started, 2)}
        return doc


def same_geometry(old: Manifest, new: Manifest) -> bool:
    """Whether the running preprocess and postprocess workers can serve the new model:
    the same input and output sizes, head, classes, palette and `align_corners`."""
    return all(getattr(old, key) == getattr(new, key) for key in (
        "input_size", "logits_size", "head", "num_classes", "class_names", "palette",
        "align_corners"))


def classes_problem(old: Manifest, new: Manifest) -> str | None:
    """Why a model's answers would mean other things than the running one's (None: the
    same classes, by number and name)."""
    if old.num_classes != new.num_classes:
        return f"has {new.num_classes} classes, the running model {old.num_classes}"
    if tuple(old.class_names) != tuple(new.class_names):
        differ = next(i for i, (a, b) in enumerate(zip(old.class_names, new.class_names,
                                                       strict=False)) if a != b)
        return (f"names class {differ} {new.class_names[differ]!r}, the running model "
                f"{old.class_names[differ]!r}")
    return None


def _batch_size(manifest: Manifest, running: int | None) -> int:
    """The running batch size if the new model has it built, else its default."""
    return running if running in manifest.models else pick_batch_size(manifest, None)


def _check_artefacts(directory: Path, cfg: PipelineConfig) -> None:
    """ValueError (naming the fix) when the directory has nothing the running backend can
    open: found in a moment, before any worker starts."""
    from pspnet.model.artefacts import choose

    choose(directory, cfg.backend, cfg.devices, cfg.precision)


def _who(origin: Any) -> str:
    return origin if isinstance(origin, str) else "client"
