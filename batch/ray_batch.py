"""`pspnet batch`: many images through a Ray Data pipeline, on one machine or a Ray cluster.

Why Ray Data beside the daemon: the daemon is the engine of one node. For a million images
on shared storage, or a cluster of GPU nodes, Ray Data already is the engine of that shape:
CPU tasks streaming into GPU actors with backpressure, retries and autoscaling, the same
code on a laptop or a cluster (KubeRay runs it on Kubernetes: `deploy/rayjob.yaml`). This
module only wires the stage functions into it; it imports none of the daemon:

    rows (index, path, truth)
      -> decode + letterbox          CPU tasks          pspnet.model.image_io
      -> Segmenter actors            one backend each   pspnet.stages.backends (num_gpus=1 on GPUs),
                                                        batches of the model's static size
      -> labels, mask PNG, areas     CPU tasks          pspnet.stages.postprocess.finish
      -> this process: sums the areas, lists what failed, prints progress

The answer is `pspnet eval`'s: same mask files (name, palette, source chunk), same areas,
same result JSON (pspnet.batch.eval.report). A bad image or ground truth is a failed row with
its reason, never an exception out of a task. Ray is imported inside the functions that
use it: importing this module (or any other command) needs no Ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pspnet.batch.eval import EvalOutcome
from pspnet.batch.job import BatchJob
from pspnet.batch.progress import Progress
from pspnet.batch.voc import VocItem, VocSplit
from pspnet.model.metrics import IoUAccumulator

# images per decode / postprocess task call: each call costs Ray a scheduling round and an
# object-store put; at 8 the 192-image pass of studies.ray_compare ran at 16 img/s, at 32 at
# 22 img/s (2 cores, 384x384 model)
DECODE_ROWS = 32
POST_ROWS = 32
# Memory each task reserves: a worker process with numpy, cv2 and torch loaded, plus, per
# pixel of the largest image it may take (--max-pixels), what it holds: decode the RGB
# pixels (3 B) and the file; postprocess a float32 class plane, the running maximum
# (4 + 4 B), the labels and a mask (1 + 1 B). Ray schedules by it, so a node runs no more
# of them than its memory holds; and, unlike the executor's, it keeps Ray from fusing
# these tasks into the executor actor (stages with equal resources are fused).
WORKER_BYTES = 384 << 20
DECODE_BYTES_PER_PIXEL = 4
POST_BYTES_PER_PIXEL = 10
PLACEMENT = ("orig_h", "orig_w", "top", "left", "height", "width")


class JobFailed(RuntimeError):
    """The job could not run (no GPU for --device cuda, an executor that cannot open its
    backend...): one line for the user; Ray's own log has the details."""


# ---- inputs ------------------------------------------------------------------------------

def from_listing(listing: Path) -> VocSplit:
    """One image per line, `IMAGE` or `IMAGE<TAB>TRUTH` (relative paths: from the listing's
    folder); blank lines and `#` comments skipped. Nothing is opened here: on shared
    storage a million stat calls would be the slowest part; a missing file fails its row."""
    listing = Path(listing)
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{listing}: cannot read the listing: {exc}") from None
    base = listing.parent
    items: list[VocItem] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        image, _, truth = line.rstrip("\n").partition("\t")
        image_path = base / image.strip()
        truth_path = base / truth.strip() if truth.strip() else None
        items.append(VocItem(image_path.stem, image_path, truth_path))
    if not items:
        raise ValueError(f"{listing}: lists no images")
    return VocSplit(listing, "", items, [], len(items))


# ---- the stage functions as Ray Data batch functions (plain numpy dicts in and out) ------

def decode_rows(batch: dict[str, np.ndarray], input_size: tuple[int, int],
                max_pixels: int) -> dict[str, np.ndarray]:
    """Decode and letterbox each row's image; a bad one gets an error and zero pixels."""
    import cv2

    from pspnet.model.image_io import ImageError, decode_image, letterbox

    cv2.setNumThreads(1)                        # one task = one core; Ray scales out
    n = len(batch["path"])
    pixels = np.zeros((n, *input_size, 3), np.uint8)
    placement = np.zeros((n, len(PLACEMENT)), np.int32)
    error = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            rgb = decode_image(str(path), max_pixels)
            _, where = letterbox(rgb, input_size, out=pixels[i])
            placement[i] = [getattr(where, name) for name in PLACEMENT]
        except ImageError as exc:
            error[i] = f"preprocess: {exc}"
        except Exception as exc:                # a decoder bug costs the row, not the job
            error[i] = f"preprocess: cannot read image: {type(exc).__name__}: {exc}"
    return {"index": batch["index"], "path": batch["path"], "truth": batch["truth"],
            "pixels": pixels, "placement": placement, "error": error}


class Segmenter:
    """One backend, opened once per actor; each call runs one static-size batch (rows
    that failed to decode are left out, a short batch is padded with empty boxes)."""

    def __init__(self, job: BatchJob) -> None:
        from pspnet.model.manifest import Manifest
        from pspnet.stages.backends import open_backend

        device = "cuda:0" if job.device == "cuda" else "cpu"   # Ray sets the visible GPU
        self.backend = open_backend(job.backend, job.model_dir, job.batch_size,
                                    device=device, precision=job.precision,
                                    options=dict(job.backend_options))
        manifest = Manifest.read(job.model_dir)
        # every block's output column has one shape, whichever of its rows ran
        self.output_shape, self.output_dtype = (
            ((manifest.num_classes, *manifest.logits_size), np.float32)
            if manifest.head == "logits" else (tuple(manifest.input_size), np.uint8))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        error = batch["error"].copy()
        rows = np.flatnonzero(error == "")
        output = np.zeros((len(error), *self.output_shape), self.output_dtype)
        if len(rows):
            try:
                output[rows] = self._run(batch["pixels"][rows], batch["placement"][rows])
            except Exception as exc:            # the batch's rows fail, the actor lives on
                error[rows] = f"executor: inference failed: {exc}"
        return {"index": batch["index"], "path": batch["path"], "truth": batch["truth"],
                "placement": batch["placement"], "error": error, "output": output}

    def _run(self, pixels: np.ndarray, placement: np.ndarray) -> np.ndarray:
        backend, count = self.backend, len(pixels)
        if count > backend.batch_size:
            raise ValueError(f"{count} rows for a batch of {backend.batch_size}")
        images, boxes = backend.host_buffers(0)
        images[:count] = pixels
        boxes[:] = 0                            # filler rows: empty box, output dropped
        boxes[:count] = placement[:, 2:]        # top, left, height, width
        backend.upload(0, images, boxes)
        return np.array(backend.execute(0)[:count])


def finish_rows(batch: dict[str, np.ndarray], model_dir: str, out_dir: str | None,
                max_pixels: int) -> dict[str, np.ndarray]:
    """Each row that got an output through the daemon's own postprocess function
    (pspnet.stages.postprocess.finish): labels at the original size, the mask, the areas."""
    import torch

    from pspnet.core import wire
    from pspnet.stages.postprocess import finish

    torch.set_num_threads(1)
    manifest = _manifest(model_dir)
    masks = None if out_dir is None else Path(out_dir)
    n = len(batch["path"])
    error = batch["error"].copy()
    mask = np.full(n, "", dtype=object)
    areas = np.zeros((n, 4, manifest.num_classes), np.int64)
    scored = np.zeros(n, np.bool_)
    for i in np.flatnonzero(error == ""):
        p = batch["placement"][i]
        where = wire.Placement(orig_h=int(p[0]), orig_w=int(p[1]), scale=0.0, top=int(p[2]),
                               left=int(p[3]), height=int(p[4]), width=int(p[5]))
        request = wire.Request(id=str(batch["index"][i]), path=str(batch["path"][i]),
                               ann=str(batch["truth"][i]) or None)
        result = finish(wire.Output(request, where, manifest.head, batch["output"][i]),
                        manifest, masks, max_pixels)
        if result.status != wire.OK:
            error[i] = f"{result.stage}: {result.error}"
            continue
        mask[i] = result.mask or ""
        if result.areas is not None:
            areas[i], scored[i] = result.areas, True
    return {"index": batch["index"], "error": error, "mask": mask, "areas": areas,
            "scored": scored}


_manifests: dict[str, Any] = {}


def _manifest(model_dir: str) -> Any:
    """One manifest read per worker process, not one per batch."""
    from pspnet.model.manifest import Manifest

    if model_dir not in _manifests:
        _manifests[model_dir] = Manifest.read(Path(model_dir))
    return _manifests[model_dir]


# ---- the driver ----------------------------------------------------------------------------

def connect(job: BatchJob) -> dict[str, Any]:
    """Join the cluster at `job.address` (or RAY_ADDRESS, which a KubeRay RayJob sets), else
    start a local one. Ray's own dashboard stays off: nothing here serves a web page."""
    import ray

    if not ray.is_initialized():
        _started.append(True)                   # shutdown() ends only what we started
        if job.address or os.environ.get("RAY_ADDRESS"):
            token_auth_if_token_here()
            ray.init(address=job.address, logging_level=logging.WARNING)
        else:
            quiet_local_instance()
            ray.init(num_cpus=job.num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING)
    return {k: float(v) for k, v in ray.cluster_resources().items()
            if k in ("CPU", "GPU", "memory", "object_store_memory")}


# Ray's own lines that say nothing to a user of a local instance this process starts (a
# cluster's user keeps them: there, token authentication and the driver's errors matter)
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOKEN_FILE = Path("~/.ray/auth_token")      # where `ray start` keeps the cluster's token
AUTH_HINT = (f"a cluster started with `ray start` (Ray 2.5x) uses token authentication: "
             f"set {AUTH_MODE}=token with its token in {TOKEN_FILE} or {TOKEN_VARS[0]}")


def token_auth_if_token_here() -> bool:
    """Joining a cluster: Ray's driver speaks token authentication only when RAY_AUTH_MODE
    says so, while `ray start --head` turns it on by default; without it the join fails
    after 20 s of InvalidAuthToken warnings. A token at hand (the file `ray start` wrote,
    or the variables) means token mode; RAY_AUTH_MODE set by the user wins."""
    if AUTH_MODE in os.environ:
        return False
    if not (any(os.environ.get(v) for v in TOKEN_VARS) or TOKEN_FILE.expanduser().is_file()):
        return False
    os.environ[AUTH_MODE] = "token"
    return True


def quiet_local_instance() -> None:
    """Before ray.init of our own instance: no "Token authentication is enabled for this
    Ray cluster" warning (the instance is ours, on loopback, gone when the job ends).

    Not filtered, because it is written by Ray's C++ core to this process's stderr: one
    `E ... core_worker.cc ... constructor arguments in the object store and max_restarts >
    0` line, which Ray Data's own map-worker actors always cause (they carry their task in
    the object store and may restart); it is harmless, and `pspnet batch --help` says so.
    (RAY_BACKEND_LOG_LEVEL=fatal would hide it but prints a line of its own per process.)"""
    logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)


def pipeline(job: BatchJob, items: list[VocItem], input_size: tuple[int, int]) -> Any:
    """The Ray Dataset of finished rows (lazy: nothing runs until it is iterated)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)   # not a line per dataset
    # nor the hint to turn Ray's progress bars back on: our own line replaces them
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False            # our own line on stderr instead
    ctx.print_on_execution_start = os.environ.get("PSPNET_RAY_PLAN") == "1"
    rows = [{"index": i, "path": str(item.image),
             "truth": "" if item.truth is None else str(item.truth)}
            for i, item in enumerate(items)]
    blocks = max(1, min(len(rows) // DECODE_ROWS, 4096))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(decode_rows, batch_size=DECODE_ROWS, batch_format="numpy",
                        fn_kwargs={"input_size": tuple(input_size),
                                   "max_pixels": job.max_pixels},
                        num_cpus=1, memory=WORKER_BYTES + DECODE_BYTES_PER_PIXEL * job.max_pixels)
    ds = ds.map_batches(
        Segmenter, batch_size=job.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"job": job},
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, job.executors)),
        num_cpus=job.executor_cpus, num_gpus=1 if job.device == "cuda" else 0)
    return ds.map_batches(finish_rows, batch_size=POST_ROWS, batch_format="numpy",
                          fn_kwargs={"model_dir": str(job.model_dir),
                                     "out_dir": None if job.out_dir is None
                                     else str(job.out_dir),
                                     "max_pixels": job.max_pixels},
                          num_cpus=1, memory=WORKER_BYTES + POST_BYTES_PER_PIXEL * job.max_pixels)


def finished_rows(ds: Any) -> Iterator[dict[str, Any]]:
    """Each finished row as it streams out of the cluster."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["index"])):
            yield {key: batch[key][i] for key in batch}


def run(job: BatchJob, split: VocSplit, num_classes: int, input_size: tuple[int, int],
        progress: Progress | None = None) -> tuple[EvalOutcome, dict[str, Any]]:
    """Run the split through the cluster: the outcome (as `pspnet eval`'s) and timings."""
    started = time.monotonic()
    resources = connect(job)
    connected = time.monotonic()
    gpus = int(resources.get("GPU", 0))
    if job.device == "cuda" and not gpus and not (job.address or os.environ.get("RAY_ADDRESS")):
        raise JobFailed("--device cuda: this machine's Ray instance has no GPU")
    if not job.executors:                       # one per GPU, else one
        job = replace(job, executors=gpus if job.device == "cuda" and gpus else 1)
    outcome = EvalOutcome(IoUAccumulator(num_classes))
    first = None
    if progress is not None:
        progress.restart()
    seen: set[int] = set()
    try:
        for row in finished_rows(pipeline(job, split.items, input_size)):
            first = first or time.monotonic()
            index = int(row["index"])
            seen.add(index)
            failed = account(outcome, split.items[index], row)
            if progress is not None:
                progress.update(failed=int(failed))
    except Exception as exc:
        raise JobFailed(f"the Ray job failed: {root_cause(exc)}") from exc
    done = time.monotonic()
    for index in sorted(set(range(len(split.items))) - seen):   # Ray lost a block
        item = split.items[index]
        outcome.failed.append({"id": item.id, "path": str(item.image),
                               "reason": "ray: the row never came back (see Ray's logs)"})
    outcome.elapsed_s = done - connected
    timings = {"connect_s": round(connected - started, 3),
               "first_result_s": round(first - connected, 3) if first else None,
               "executors": job.executors, "resources": resources}
    return outcome, timings


def root_cause(exc: BaseException) -> str:
    """The user's error under Ray's wrappers, one line. Ray Data raises a UDF's error on the
    driver as RayTaskError(UserCodeException) whose text carries the worker's traceback: the
    first traceback's last line ("ImportError: cannot import ...") is what a user needs."""
    text = str(exc)
    for joint in ("The above exception was the direct cause",
                  "During handling of the above exception"):
        text = text.split(joint, 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def account(outcome: EvalOutcome, item: VocItem, row: dict[str, Any]) -> bool:
    """Add one finished row to the outcome as `pspnet eval` does; True if it failed."""
    error = str(row["error"])
    if not error:
        outcome.segmented += 1
        if row["mask"]:
            outcome.masks[item.id] = str(row["mask"])
        if row["scored"]:
            outcome.metrics.add(row["areas"])
        return False
    truth_failed = "ground truth" in error
    outcome.segmented += truth_failed           # the mask was made, as in eval
    blame = item.truth if truth_failed else item.image
    outcome.failed.append({"id": item.id, "path": str(blame), "reason": error})
    return True


_started: list[bool] = []


def shutdown() -> None:
    """Leave the cluster (a local instance stops), if `connect` joined it; a caller that
    initialised Ray itself keeps its session."""
    if _started:
        import ray

        _started.clear()
        ray.shutdown()
