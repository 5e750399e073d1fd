"""Export a module to static, simplified, checked, single-file ONNX models, one per batch.

Shared by the PSPNet build and by the pooling tests, so the tests prove the exact path the
product takes: torch's default (dynamo) exporter at opset 18, which turns
`AdaptiveAvgPool2d` into an exact graph at any size (the legacy exporter refuses sizes that
do not divide the input, and mmcv's old rewrite is wrong at pool scale 6 on 63x63), then
onnxsim, then `onnx.checker`. (The ATC artefact at an older opset is made from these by
`pspnet.build_model.onnx_opset`.)

Speed: the exporter's translation and optimisation dominate (seconds for a tiny net, about a
minute for R50), so with simplification on, the module is exported ONCE with a symbolic
batch dimension and each static model is made by onnxsim with that batch size fixed (what
the reference did with `--overwrite-input-shape`); the graphs come out the same as separate
static exports. Without simplification, or if the symbolic export fails, each batch size is
exported on its own.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from pspnet.build_model.errors import BuildError
from pspnet.build_model.fmt import human_size

OPSET = 18
SINGLE_FILE_LIMIT = 2_000_000_000  # protobuf's 2 GB message limit, with a margin
# Upper bound of the symbolic batch. Not just max(batch sizes): torch.export misses a
# batch-specialising branch (`if n == 2`) when the range is as narrow as [1, 2].
SYMBOLIC_MAX = 64
_log = logging.getLogger(__name__)

ExampleInputs = Callable[[int], tuple[torch.Tensor, ...]]


def export_onnx_batches(
    module: torch.nn.Module,
    example_inputs: ExampleInputs,
    paths: Mapping[int, Path],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    simplify: bool = True,
) -> dict[int, Path]:
    """Write `module` as one static ONNX model per batch size: {batch size: path}.

    `example_inputs(n)` gives tracing inputs with batch n (dimension 0 of every input);
    their values do not matter.
    """
    module = module.eval()
    sizes = sorted(paths)
    symbolic = None
    if simplify and len(sizes) > 1:
        try:
            symbolic = _export(module, example_inputs(2), input_names, output_names,
                               batch_dim=max(sizes))
        except Exception as exc:  # any failure: export each batch size statically
            _log.warning("symbolic-batch ONNX export failed (%s: %s); exporting each batch "
                         "size separately", type(exc).__name__, _first_line(exc))
    written = {}
    for n in sizes:
        path = Path(paths[n])
        shapes = {name: list(t.shape) for name, t in
                  zip(input_names, example_inputs(n), strict=True)}
        if symbolic is not None:
            model = _simplify(symbolic, path.name, shapes)
            _require_static(model, path.name)
        else:
            _log.info("exporting %s", path.name)
            model = _export(module, example_inputs(n), input_names, output_names)
            if simplify:
                model = _simplify(model, path.name, None)
        save_and_check(model, path)
        written[n] = path
    return written


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    simplify: bool = True,
) -> Path:
    """One static model with the shapes of `args` (a single batch size)."""
    batch = int(args[0].shape[0])
    written = export_onnx_batches(module, lambda n: args, {batch: Path(path)},
                                  input_names=input_names, output_names=output_names,
                                  simplify=simplify)
    return written[batch]


def _export(module, args, input_names, output_names, batch_dim: int | None = None):
    """The dynamo exporter; `batch_dim` makes dimension 0 of every input symbolic."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quiet_exporter_logs()
        model = module
        if batch_dim is not None:
            # torch.export itself, so that a network whose Python code depends on the batch
            # size raises here (and we fall back to static exports); torch.onnx.export given
            # the module would quietly retry without the symbolic batch and produce a graph
            # that is wrong for other batch sizes.
            batch = torch.export.Dim("batch", min=1, max=max(batch_dim, SYMBOLIC_MAX))
            model = torch.export.export(module, args,
                                        dynamic_shapes=tuple({0: batch} for _ in args))
        program = torch.onnx.export(
            model, args, None, dynamo=True, opset_version=OPSET, verbose=False,
            input_names=list(input_names), output_names=list(output_names),
        )
    return program.model_proto


def _simplify(model, name: str, input_shapes: dict[str, list[int]] | None):
    import onnxsim

    _log.info("simplifying %s", name)
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes=input_shapes)
    if not ok:
        raise BuildError(f"onnxsim could not validate the simplified {name}; "
                         "rerun with --no-simplify")
    return simplified


def _require_static(model, name: str) -> None:
    """Every input and output dimension must be a number once the batch size is fixed."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise BuildError(f"{name}: {value.name} is not static after simplification; "
                             "rerun with --no-simplify")


def save_and_check(model, path: Path) -> None:
    """Write `model` (one file, or with external data past protobuf's limit) and check it."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if model.ByteSize() < SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name)
    _log.info("checking %s", path.name)
    onnx.checker.check_model(str(path), full_check=True)
    size = sum(p.stat().st_size for p in (path, data) if p.exists())
    _log.info("wrote %s (%s)", path, human_size(size))


def _quiet_exporter_logs() -> None:
    """The exporter warns that torchvision ops are missing (PSPNet uses none of them) and
    its optimiser logs every pass at INFO; keep the build's own progress readable."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
