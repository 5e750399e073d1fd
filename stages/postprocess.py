"""Postprocess worker: one image's logits or labels -> mask PNG and IoU areas.

The areas (intersect, union, pred, label per class) travel back with the answer and the
front sums them, so a crashed worker loses no metric state.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import zmq

from stages import wire
from stages.child import Child, error_result
from stages.config import Addresses, PipelineConfig, output_problem
from stages.labels import (
    GroundTruthError,
    intersect_and_union,
    labels_from_labels,
    labels_from_logits,
    mask_path,
    read_ground_truth,
    write_mask,
)
from stages.manifest import Manifest

STAGE = "postprocess"
POLL_MS = 500


def main(cfg: PipelineConfig, addrs: Addresses, index: int, supervised: bool = True,
         ) -> None:
    """Run until killed. `supervised`: started by the front, so exit when it is gone."""
    child = Child(STAGE, index, cfg, addrs.results, watch_parent=supervised)
    torch.set_num_threads(max(1, cfg.worker_threads))
    try:
        manifest = Manifest.read(cfg.model_dir)
    except (OSError, ValueError) as exc:
        child.fatal(str(exc))
    out_dir = cfg.out_dir if cfg.write_masks else None
    if out_dir is not None:
        problem = output_problem(out_dir, directory=True)
        if problem:                      # every mask would fail; a crash would only restart us
            child.fatal(f"mask directory (--out) {problem}")

    receiver = child.ctx.socket(zmq.PULL)       # outputs <- executors (via front)
    receiver.setsockopt(zmq.LINGER, 0)
    receiver.setsockopt(zmq.RCVHWM, 8)          # hold little: a crash loses little
    receiver.connect(addrs.outputs_out)
    results = child.ctx.socket(zmq.PUSH)        # answers -> front
    results.setsockopt(zmq.LINGER, -1)
    results.connect(addrs.results)

    child.start_heartbeat()
    child.log.info("ready", masks=str(out_dir) if out_dir else None)
    while True:
        if not receiver.poll(POLL_MS):
            continue
        frames = receiver.recv_multipart(copy=False)
        started = time.perf_counter()
        try:
            output = wire.decode_as(frames, wire.Output)
        except wire.WireError as exc:
            child.log.warning("malformed message dropped", error=str(exc), id=exc.request_id)
            child.count(errors=1)
            continue
        result = finish(output, manifest, out_dir)
        results.send_multipart(wire.encode(result))
        child.count(processed=int(result.status == wire.OK),
                    errors=int(result.status != wire.OK),
                    busy_s=time.perf_counter() - started)


def finish(output: wire.Output, manifest: Manifest, out_dir: Path | None) -> wire.Result:
    """Labels at the original size, the mask written, the areas counted: one answer."""
    request = output.request
    try:
        if output.head == "logits":
            labels = labels_from_logits(output.data, output.placement, manifest.input_size)
        else:
            labels = labels_from_labels(output.data, output.placement)
        mask = None
        if out_dir is not None:
            target = mask_path(out_dir, request.path)
            write_mask(labels, target, manifest.palette, source=request.path)
            mask = str(target)
        areas = None
        if request.ann:
            truth = read_ground_truth(request.ann)
            areas = intersect_and_union(labels, truth, manifest.num_classes)
    except (GroundTruthError, OSError, ValueError) as exc:
        return error_result(request, STAGE, str(exc))
    return wire.Result(id=request.id, attempt=request.attempt, status=wire.OK,
                       path=request.path, mask=mask, stage=STAGE,
                       areas=np.ascontiguousarray(areas, dtype=np.int64)
                       if areas is not None else None)
