"""`pspnet serve`, `pspnet submit`, `pspnet status`: arguments and what each runs; and the
pipeline flags that eval, bench and worker share with serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pspnet.core.cli_args import (
    HelpFormatter,
    base_port,
    device_list,
    host_address,
    key_value,
    non_negative_float,
    outputs_problem,
    positive_float,
    positive_int,
)
from pspnet.core.config import BACKENDS, DEFAULT_MAX_PIXELS, PRECISIONS, SIMULATED
from pspnet.core.exits import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE
from pspnet.core.logs import json_safe
from pspnet.daemon.endpoint import default_endpoint, parse_endpoint


def add_daemon_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = HelpFormatter
    serve = sub.add_parser(
        "serve", formatter_class=fmt,
        help="run the daemon: decode pool -> batched executor -> postprocess",
        description="Run the segmentation daemon until SIGTERM/Ctrl-C (the first drains every "
                    "accepted request and exits 0; a second, or --drain-timeout running out, "
                    "answers what is left with an error and exits 1). Clients reach it "
                    "with `pspnet submit`; with --watch it also processes every image that "
                    "lands in a folder.",
        epilog="example: pspnet serve --model models/r50 --backend ort --out masks/ "
               "--watch incoming/")
    add_pipeline_args(serve)
    serve.add_argument("--endpoint", default=None,
                       help="where clients connect: ipc://PATH or tcp://HOST:PORT "
                            "(default: ipc socket in a private 0700 runtime dir, which submit "
                            "and status find by themselves; env PSPNET_ENDPOINT overrides)")
    serve.add_argument("--watch", type=Path, default=None, metavar="DIR",
                       help="also process images already in DIR and each one that lands "
                            "there later; a record next to the masks makes restarts "
                            "neither lose nor redo images")
    serve.add_argument("--max-queue", type=positive_int, default=1024,
                       help="requests accepted but not answered; beyond it clients are "
                            "told `busy` and slow down")
    serve.add_argument("--drain-timeout", type=non_negative_float, default=120.0, metavar="S",
                       help="on SIGTERM, wait at most this long for accepted requests; "
                            "then answer the rest with an error and exit 1")
    serve.add_argument("--metrics-json", type=Path, default=None, metavar="FILE",
                       help="write the final status (counts, mIoU) here on exit")
    serve.add_argument("--metrics-port", type=metrics_port, default=None, metavar="PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (requests "
                            "by outcome, accept-to-answer latency, queue depth, batch fill, "
                            "busy fraction per stage, restarts, images/s); 0: a free port, "
                            "logged in the `serving` line")
    serve.add_argument("--metrics-host", type=ip_address, default="127.0.0.1", metavar="ADDR",
                       help="the address /metrics listens on; 0.0.0.0 in a container, for "
                            "a scraper in another pod (the figures name no paths)")
    serve.add_argument("--allow-root", type=Path, action="append", default=[], metavar="DIR",
                       help="only read images and ground truths under DIR (repeatable); "
                            "required when --endpoint is reachable from other hosts")
    serve.add_argument("--tcp-host", type=host_address, default="127.0.0.1", metavar="ADDR",
                       help="with --transport tcp: the address the front's control port and "
                            "the workers' data ports are bound on, and that this host's own "
                            "workers connect to. The "
                            "default admits this host only; give this host's address on a "
                            "trusted network to let `pspnet worker --front ADDR` join from "
                            "others (the internal ports carry no authentication)")
    serve.set_defaults(run=run_serve)

    submit = sub.add_parser(
        "submit", formatter_class=fmt,
        help="send images to the running daemon; one JSON line per result",
        description="Send image paths to a running daemon and print one JSON line per image "
                    "as it finishes: id, path, status (ok|error), mask, error, latency_ms. "
                    "Exit status 0 only if every image succeeded.",
        epilog="example: pspnet submit photos/*.jpg --ann gt/*.png")
    submit.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="images to segment")
    submit.add_argument("--ann", nargs="+", type=Path, default=None, metavar="GT",
                        help="ground-truth palette PNGs, one per PATH in the same order "
                             "(the daemon then keeps a running mIoU); put --ann after the "
                             "images: it takes every path that follows it")
    submit.add_argument("--endpoint", default=None,
                        help="daemon address (default: the local daemon's ipc socket)")
    submit.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                        help="give up on images not answered after S seconds "
                             "(reported as errors)")
    submit.set_defaults(run=run_submit)

    status = sub.add_parser(
        "status", formatter_class=fmt,
        help="print the daemon's status as JSON",
        description="Print JSON: per stage (processes alive, queue depth, processed, errors, "
                    "restarts), images/s over the last 10 s, and the running mIoU when "
                    "ground truth was given.")
    status.add_argument("--endpoint", default=None,
                        help="daemon address (default: the local daemon's ipc socket)")
    status.set_defaults(run=run_status)


def metrics_port(text: str) -> int:
    """argparse type: a tcp port, or 0 for one the system chooses."""
    return 0 if text.strip() == "0" else base_port(text)


def ip_address(text: str) -> str:
    """argparse type: an IPv4 or IPv6 address to listen on (0.0.0.0: every interface)."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address, not {text!r}") from None


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by serve, eval and bench: which model, which backend, how many workers."""
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="a directory made by `pspnet build` (manifest.json + models)")
    p.add_argument("--backend", choices=(*BACKENDS, SIMULATED), default="ort",
                   help="ort: ONNX Runtime; torch: PyTorch (CPU or CUDA); acl: Ascend "
                        "aclruntime + OM (unverified on real hardware); sim: no model, a "
                        "simulated device of --backend-option img_s=N speed, to measure "
                        "the host side (its masks are a fixed pattern)")
    p.add_argument("--devices", type=device_list, default="cpu",
                   help="comma list, one executor each: cpu, cuda:0, cuda:1 (torch/ort), "
                        "or npu:0,npu:1 (acl)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="torch backend compute precision")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="static batch size to run (default: 16 if built, else the largest)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=20.0,
                   help="run a partial batch after waiting this long for it to fill, "
                        "if the device is idle (while a batch runs, keep filling)")
    p.add_argument("--preprocess-workers", type=positive_int, default=2, metavar="K",
                   help="JPEG decode + letterbox processes")
    p.add_argument("--postprocess-workers", type=positive_int, default=2, metavar="M",
                   help="upsample/argmax/mask/mIoU processes")
    p.add_argument("--out", type=Path, default=None, metavar="MASKDIR",
                   help="write masks here as palette PNGs named after each image's "
                        "stem; an image whose mask name already holds another image's mask "
                        "(b/x.jpg after a/x.jpg) is answered with an error, the same image "
                        "again replaces its own (without --out no mask files are written; "
                        "answers carry mask null)")
    p.add_argument("--no-masks", action="store_true", help="do not write masks (benches)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels (read from the header, before "
                        "decoding)")
    p.add_argument("--max-inflight", type=positive_int, default=None,
                   help="requests inside the pipeline at once (bounds memory; default: four "
                        "batches per executor, at least 64)")
    p.add_argument("--backend-option", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="backend tuning, repeatable: threads=N (ort/torch), cuda_graphs=1, "
                        "compile=1, compile_cache=DIR (torch), img_s=N, sync=1 (sim; and "
                        "fault=hang|thread_exit, fault_after=N, fault_flag=FILE to simulate "
                        "a stuck or broken device in reliability tests)")
    p.add_argument("--liveness-timeout", type=positive_float, default=5.0, metavar="S",
                   help="a worker whose work loop has not reported progress for S seconds "
                        "(hung, stopped, a device call stuck past its allowance) is "
                        "stopped and restarted, and what it held is retried once")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                   help="between the daemon's own processes")
    p.add_argument("--tcp-base-port", type=base_port, default=5550,
                   help="with --transport tcp: the front's control port (workers' data "
                        "ports are chosen by the system and reported to the front)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info", help="debug adds per-batch timings")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                   help="auto: console lines on a TTY, JSON lines otherwise")


def pipeline_config(args: argparse.Namespace) -> object:
    from pspnet.core.config import PipelineConfig

    return PipelineConfig(
        model_dir=args.model, backend=args.backend, devices=tuple(args.devices),
        precision=args.precision, batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
        preprocess_workers=args.preprocess_workers,
        postprocess_workers=args.postprocess_workers, out_dir=args.out,
        write_masks=args.out is not None and not args.no_masks, max_pixels=args.max_pixels,
        max_inflight=args.max_inflight, transport=args.transport,
        tcp_base_port=args.tcp_base_port, backend_options=dict(args.backend_option),
        liveness_timeout_s=args.liveness_timeout, log_level=args.log_level,
        log_json={"auto": None, "json": True, "console": False}[args.log_format],
    )


def usage_error(command: str, message: str) -> int:
    sys.stderr.write(f"pspnet {command}: error: {message}\n")
    return EXIT_USAGE


def run_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pspnet.core.logs import configure_logging
    from pspnet.daemon.server import ServeConfig, Server, check_exposure
    from pspnet.model.manifest import Manifest, pick_batch_size

    cfg = pipeline_config(args)
    configure_logging(cfg.log_level, cfg.log_json)
    try:
        batch = pick_batch_size(Manifest.read(args.model), args.batch_size)
    except (OSError, ValueError) as exc:
        return usage_error("serve", str(exc))
    if args.tcp_host != "127.0.0.1" and args.transport != "tcp":
        return usage_error("serve", "--tcp-host needs --transport tcp")
    # the logged config says what runs
    cfg = replace(cfg, batch_size=batch, tcp_host=args.tcp_host)
    if args.watch is not None and not args.watch.is_dir():
        return usage_error("serve", f"--watch {args.watch}: not a directory")
    if args.watch is not None and args.out is None:
        return usage_error("serve", "--watch needs --out (the record lives next to the masks)")
    if args.watch is not None and args.watch.resolve() == args.out.resolve():
        return usage_error("serve", "--watch and --out are the same folder: every mask would "
                                    "come back in as a new image; give masks their own folder")
    problem = outputs_problem(("--out", args.out, True),
                              ("--metrics-json", args.metrics_json, False))
    if problem:
        return usage_error("serve", problem)
    endpoint = args.endpoint or default_endpoint()
    problem = check_exposure(endpoint, tuple(args.allow_root))
    if problem:
        return usage_error("serve", problem)
    port = parse_endpoint(endpoint).port
    if cfg.transport == "tcp" and port in cfg.tcp_port_range:
        return usage_error("serve", f"--endpoint's port {port} is the internal control port "
                                    f"(--tcp-base-port {cfg.tcp_base_port}); move one of them")
    server = Server(ServeConfig(pipeline=cfg, endpoint=endpoint, watch=args.watch,
                                max_queue=args.max_queue, drain_timeout_s=args.drain_timeout,
                                metrics_json=args.metrics_json,
                                allow_roots=tuple(args.allow_root),
                                metrics_port=args.metrics_port,
                                metrics_host=args.metrics_host))
    return server.serve()


def run_submit(args: argparse.Namespace) -> int:
    from pspnet.daemon.client import Client, DaemonUnavailable

    if args.ann is not None and len(args.ann) != len(args.paths):
        return usage_error("submit", f"{len(args.paths)} paths but {len(args.ann)} --ann files")
    failed = 0
    try:
        try:
            client = Client(args.endpoint or default_endpoint())
        except ValueError as exc:          # a malformed --endpoint, before any socket
            return usage_error("submit", str(exc))
        with client:
            for answer in client.submit(args.paths, args.ann, timeout_s=args.timeout):
                failed += answer.status != "ok"
                print_json(answer.as_dict())
    except DaemonUnavailable as exc:
        sys.stderr.write(f"pspnet submit: error: {exc} (is `pspnet serve` running?)\n")
        return EXIT_UNAVAILABLE
    return EXIT_FAILED if failed else 0


def print_json(doc: object) -> None:
    """One JSON line on stdout, flushed at once: a reader sees each answer as it comes."""
    sys.stdout.write(json.dumps(json_safe(doc), default=str) + "\n")
    sys.stdout.flush()


def run_status(args: argparse.Namespace) -> int:
    """The daemon's status document, printed as it came once it reads as one (keys a
    newer daemon added stay in the output)."""
    from pspnet.core.status import Status
    from pspnet.daemon.client import Client, DaemonUnavailable

    endpoint = args.endpoint or default_endpoint()
    try:
        try:
            client = Client(endpoint)
        except ValueError as exc:          # a malformed --endpoint, before any socket
            return usage_error("status", str(exc))
        with client:
            doc = client.status()
    except DaemonUnavailable as exc:
        sys.stderr.write(f"pspnet status: error: {exc} (is `pspnet serve` running?)\n")
        return EXIT_UNAVAILABLE
    try:
        Status.from_document(doc)
    except ValueError as exc:
        sys.stderr.write(f"pspnet status: error: {endpoint} answered, but not with a status "
                         f"this version of pspnet reads ({exc}); is it an older daemon?\n")
        return EXIT_FAILED
    print_json(doc)
    return 0
