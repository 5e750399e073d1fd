"""Everything `pspnet build` writes, from any core network: no mmseg needed here.

`write_artifacts` takes a torch module mapping normalised float32 N x 3 x H x W to logits
and writes the model directory: one static ONNX per batch size around
`pspnet.model.serving_model.ServingModel`, the ATC scripts, the torch program and
`manifest.json`. The mmseg path (`pspnet.build_model.export.build`) and tests that make tiny
models both come through here, so they share one export path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pspnet.build_model import atc
from pspnet.build_model.errors import BuildError
from pspnet.build_model.fmt import human_size
from pspnet.build_model.onnx_export import OPSET, export_onnx_batches, save_and_check
from pspnet.build_model.onnx_opset import ATC_OPSET, MIN_OPSET
from pspnet.build_model.torch_program import DYNAMIC_NAME, export_core_program
from pspnet.model.manifest import OM_DEFAULT_PRECISION, OM_PRECISION_MODES, Manifest, ModelFile
from pspnet.model.serving_model import HEADS, ServingModel

MAX_BATCH = 256
DEFAULT_SOC = "Ascend310P3"
_log = logging.getLogger(__name__)


def onnx_name(batch_size: int) -> str:
    return f"pspnet_bs{batch_size}.onnx"


def atc_onnx_name(batch_size: int, opset: int) -> str:
    """The ATC artefact: the same graph at an older opset."""
    return f"pspnet_bs{batch_size}_opset{opset}.onnx"


def write_artifacts(
    core: torch.nn.Module,
    out_dir: Path,
    *,
    input_size: int | tuple[int, int],
    batch_sizes: Sequence[int],
    head: str,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    source: Mapping[str, Any],
    simplify: bool = True,
    soc_version: str = DEFAULT_SOC,
    run_atc: bool | None = None,
    torch_program: bool = True,
    onnx: bool = True,
    rewrites: Mapping[str, Any] | None = None,
    align_corners: bool = False,
    network: Mapping[str, Any] | None = None,
    atc_opset: int = ATC_OPSET,
    om_precision: str = OM_DEFAULT_PRECISION,
) -> Manifest:
    """Export `core` for every batch size into `out_dir` and write its manifest.

    `run_atc=None` runs the ATC scripts when `atc` is on PATH; False only writes them.
    `torch_program=False` skips the `.pt2` (the manifest then has no torch program).
    `onnx=False` skips the ONNX models and their ATC scripts: a directory for the torch
    backend only (the manifest still names the ONNX files; `source.onnx` says why absent).
    `rewrites` is what was done to `core` before (pspnet.build_model.rewrites), for the manifest.
    `align_corners`: how the network's logits are resized (its decode head's setting; the
    labels head and the daemon's postprocess follow it); `network`: manifest.network.
    `atc_opset`: the opset of the ONNX the ATC scripts read (a converted copy when it is
    older than the export's); `om_precision`: what the OMs compute in, fp16 (ATC's
    force_fp16) or fp32 (must_keep_origin_dtype).
    """
    size = normalise_input_size(input_size)
    sizes = normalise_batch_sizes(batch_sizes)
    check_atc_choices(atc_opset, om_precision)
    if head not in HEADS:
        raise BuildError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if len(class_names) != num_classes or len(palette) < num_classes:
        raise BuildError(f"{num_classes} classes but {len(class_names)} names and "
                         f"{len(palette)} palette entries")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not onnx and not torch_program:
        raise BuildError("nothing to build: both the ONNX models and the torch program "
                         "are switched off")
    core = core.eval()
    logits_size = measure_logits_size(core, size, num_classes)
    serving = ServingModel(core, mean, std, head, align_corners=align_corners).eval()
    if not onnx:
        _log.info("ONNX export skipped: a model directory for the torch backend only")
        models = {n: ModelFile(onnx=onnx_name(n)) for n in sizes}
        source = {**source, "onnx": "not exported (pspnet build --no-onnx): the torch "
                                    "backend only"}
        paths: dict[int, Path] = {}
    else:
        models = {}
        paths = _export_onnx(serving, out_dir, size, sizes, head, simplify)
    run_atc = (atc.atc_available() if run_atc is None else run_atc) and onnx
    if onnx and not run_atc:
        _log.info("ATC scripts will be written but not run (%s)",
                  "atc is not on PATH" if not atc.atc_available() else "asked not to")
    try:
        atc_onnx = _atc_onnx(paths, out_dir, atc_opset)
    except BuildError as exc:      # an op the older opset lacks: no reason to fail the build
        _log.warning("%s: the ATC scripts read the opset-%d files instead (CANN 7 and 8 "
                     "parse them op by op; CANN 6.0 documents opsets 9-13)", exc, OPSET)
        atc_opset, atc_onnx = OPSET, {}
    for n, path in paths.items():
        script = atc.write_atc_script(out_dir, n, size, soc_version, rewrites,
                                      onnx_file=atc_onnx.get(n, path.name),
                                      opset=atc_opset if onnx else None,
                                      precision=om_precision)
        if run_atc:
            om = atc.run_atc_script(script, soc_version).name
            _log.info("wrote %s and ran it: %s", script, om)
        else:
            om = None
            _log.info("wrote %s (not run: no atc here; run it on the Ascend host)", script)
        models[n] = ModelFile(onnx=path.name, om=om, atc=script.name, atc_onnx=atc_onnx.get(n))
    programs = _torch_programs(core, out_dir, size, sizes) if torch_program else {}
    manifest = Manifest(
        input_size=size, head=head, num_classes=num_classes,
        class_names=tuple(class_names),
        palette=tuple(tuple(int(v) for v in c) for c in palette[:num_classes]),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
        logits_size=logits_size, models=models,
        torch_program=_single_program(programs), opset=OPSET, rewrites=dict(rewrites or {}),
        atc_opset=atc_opset if onnx else None, om_precision=om_precision if onnx else None,
        source={**source, **_program_note(programs)}, align_corners=bool(align_corners),
        network=dict(network or {}),
    )
    path = manifest.write(out_dir)
    _log.info("wrote %s", path)
    return manifest


def _export_onnx(serving: torch.nn.Module, out_dir: Path, size: tuple[int, int],
                 sizes: Sequence[int], head: str, simplify: bool) -> dict[int, Path]:
    _log.info("exporting %s (%dx%d, head %s)", ", ".join(onnx_name(n) for n in sizes),
              *size, head)
    return export_onnx_batches(
        serving, lambda n: example_inputs(n, size), {n: out_dir / onnx_name(n) for n in sizes},
        input_names=("image", "box"), output_names=(head,), simplify=simplify)


def check_atc_choices(atc_opset: int, om_precision: str) -> None:
    """BuildError unless the ATC artefact's opset and the OM precision are ones we write."""
    if not isinstance(atc_opset, int) or not MIN_OPSET <= atc_opset <= OPSET:
        raise BuildError(f"the ATC opset must be an integer from {MIN_OPSET} to {OPSET} "
                         f"(CANN 6.0 documents up to 13), not {atc_opset!r}")
    if om_precision not in OM_PRECISION_MODES:
        raise BuildError(f"the OM precision must be one of {', '.join(OM_PRECISION_MODES)}, "
                         f"not {om_precision!r}")


def _atc_onnx(paths: Mapping[int, Path], out_dir: Path, opset: int) -> dict[int, str]:
    """Write each model again at `opset` for ATC where that is older than the export's:
    {batch size: file name}; {} when ATC reads the exported files themselves."""
    if opset == OPSET or not paths:
        return {}
    import onnx

    from pspnet.build_model.onnx_opset import convert_opset, int64_ops

    names: dict[int, str] = {}
    try:
        for n, path in paths.items():
            name = atc_onnx_name(n, opset)
            _log.info("writing %s for ATC (opset %d)", name, opset)
            converted = convert_opset(onnx.load(str(path)), opset, path.name)
            save_and_check(converted, out_dir / name)
            names[n] = name
    except BuildError:
        for name in names.values():                 # no half set of copies left behind
            (out_dir / name).unlink(missing_ok=True)
        raise
    found = int64_ops(converted)
    _log.info("ops on int64 tensors at run time (ATC may put them on the AI CPU): %s",
              ", ".join(found) or "none")
    return names


def normalise_input_size(value: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int or a pair; 32..4096 pixels, a limit that catches typos."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and 32 <= v <= 4096 for v in pair):
        raise BuildError(f"input size must be an integer from 32 to 4096 (or an H, W pair "
                         f"of them), not {value!r}")
    return pair


def normalise_batch_sizes(values: Sequence[int]) -> list[int]:
    """Sorted unique batch sizes, each an int in 1..256."""
    sizes = sorted(set(values))
    bad = [v for v in sizes if not isinstance(v, int) or not 1 <= v <= MAX_BATCH]
    if not sizes or bad:
        raise BuildError(f"batch sizes must be integers from 1 to {MAX_BATCH}, "
                         f"not {list(values)!r}")
    return sizes


def measure_logits_size(
    core: torch.nn.Module, input_size: tuple[int, int], num_classes: int
) -> tuple[int, int]:
    """Run the core once on zeros and read (h, w) of its logits; check the class count."""
    with torch.no_grad():
        logits = core(torch.zeros(1, 3, *input_size))
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise BuildError(f"the network gives logits of shape {tuple(logits.shape)}, "
                         f"expected 1 x {num_classes} x h x w")
    return int(logits.shape[2]), int(logits.shape[3])


def example_inputs(batch_size: int, input_size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Tracing inputs for ServingModel; the values do not matter for a static graph."""
    height, width = input_size
    image = torch.zeros(batch_size, height, width, 3, dtype=torch.uint8)
    box = torch.tensor([[0, 0, height, width]] * batch_size, dtype=torch.int32)
    return image, box


def _torch_programs(core, out_dir: Path, size, sizes) -> dict[int, str]:
    _log.info("exporting the torch program (batch dimension dynamic)")
    programs = export_core_program(core, out_dir, input_size=size, batch_sizes=sizes)
    for name in sorted(set(programs.values())):
        _log.info("wrote %s (%s)", out_dir / name, human_size((out_dir / name).stat().st_size))
    return programs


def _single_program(programs: dict[int, str]) -> str | None:
    """The dynamic-batch program, or None when there is none (skipped or fell back)."""
    return DYNAMIC_NAME if DYNAMIC_NAME in programs.values() else None


def _program_note(programs: dict[int, str]) -> dict[str, Any]:
    """How the torch programs cover the batch sizes, for consumers and for people."""
    if not programs:
        return {}
    if DYNAMIC_NAME in programs.values():
        return {"torch_program_batch": "dynamic"}
    return {"torch_program_batch": "static", "torch_programs": {str(k): v for k, v in
                                                                  sorted(programs.items())}}
