"""`pspnet serve`, `pspnet submit`, `pspnet status`, `pspnet reload`: arguments and what each
runs; and the
pipeline flags that eval, bench and worker share with serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pspnet.core.backend_rules import AUTO, check_backend
from pspnet.core.cli_args import HelpFormatter, add_flags, flag_names, from_args, positive_float
from pspnet.core.config import PipelineConfig, outputs_problem
from pspnet.core.exits import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE
from pspnet.core.logs import json_safe
from pspnet.daemon.endpoint import default_endpoint, parse_endpoint
from pspnet.daemon.serve_config import ServeConfig

# what every command that runs the pipeline takes (serve adds --tcp-host)
PIPELINE_FLAGS = tuple(n for n in flag_names(PipelineConfig) if n != "tcp_host")
KEYS_HELP = ("a tcp endpoint's keys: the folder with client.key_secret and server.key "
             "(default: $PSPNET_KEYS)")


def add_daemon_parsers(sub: argparse._SubParsersAction) -> None:
    fmt = HelpFormatter
    serve = sub.add_parser(
        "serve", formatter_class=fmt,
        help="run the daemon: decode pool -> batched executor -> postprocess",
        description="Run the segmentation daemon until SIGTERM/Ctrl-C (the first drains every "
                    "accepted request and exits 0; a second, or --drain-timeout running out, "
                    "answers what is left with an error and exits 1). SIGHUP reloads the "
                    "model directory live (see `pspnet reload`). Clients reach it "
                    "with `pspnet submit`; with --watch it also processes every image that "
                    "lands in a folder.",
        epilog="example: pspnet serve --model models/r50 --backend ort --out masks/ "
               "--watch incoming/")
    add_pipeline_args(serve)
    add_flags(serve, ServeConfig, flag_names(ServeConfig))
    add_flags(serve, PipelineConfig, ("tcp_host",))
    serve.set_defaults(run=run_serve)

    submit = sub.add_parser(
        "submit", formatter_class=fmt,
        help="send images to the running daemon; a line per image as it finishes",
        description="Send images to a running daemon: files, folders (their images; -r: "
                    "their subfolders' too), the paths in --list FILE, or - to read paths "
                    "from stdin. On a terminal each finished image gets a readable line "
                    "(path, size, largest classes, mask, time); otherwise, or with --json, "
                    "a JSON line (id, path, status, mask, error, latency_ms, model: the "
                    "version of the model that made it, height, width, classes). Ctrl-C "
                    "cancels the images not yet started, waits briefly for "
                    "those running, prints a summary and exits 130. Exit status 0 only if "
                    "every image succeeded.",
        epilog="examples: pspnet submit photos/ -r;  find . -name '*.jpg' | pspnet submit -;  "
               "pspnet submit --upload --out masks/ photos/")
    submit.add_argument("paths", nargs="*", metavar="PATH",
                        help="images, folders of images, or - for paths on stdin")
    submit.add_argument("-r", "--recursive", action="store_true",
                        help="take the images in folders' subfolders too")
    submit.add_argument("--list", default=None, metavar="FILE",
                        help="a file with one image path per line")
    submit.add_argument("--json", action="store_true",
                        help="JSON lines even on a terminal")
    submit.add_argument("--ann", nargs="+", type=Path, default=None, metavar="GT",
                        help="ground-truth palette PNGs, one per image in the same order "
                             "(the daemon then keeps a running mIoU); put --ann after the "
                             "images: it takes every path that follows it")
    submit.add_argument("--endpoint", default=None,
                        help="the daemon's address, ipc://PATH or tcp://HOST:PORT (default: "
                             "$PSPNET_ENDPOINT, else this user's local daemon's ipc socket)")
    submit.add_argument("--keys", type=Path, default=None, metavar="DIR", help=KEYS_HELP)
    submit.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                        help="give up on images not answered after S seconds "
                             "(reported as errors)")
    # uploads (issue 26): the images' bytes instead of their paths, masks back
    submit.add_argument("--upload", action="store_true",
                        help="send each image's bytes, not its path, for a daemon that "
                             "cannot read this host's files (automatic when --endpoint is "
                             "on another host); each mask comes back in its answer")
    submit.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="with --upload: write the returned masks here, named as the "
                             "daemon names them (DIR/data/a/x.jpg.png for /data/a/x.jpg)")
    submit.add_argument("--want", choices=("png", "classes"), default=None,
                        help="with --upload: what each answer brings back: the mask (png; "
                             "the default with --out) or only the classes found (the default "
                             "without)")
    submit.add_argument("--daemon-out", action="store_true",
                        help="with --upload: the daemon also writes the mask under its own "
                             "--out")
    submit.set_defaults(run=run_submit)

    status = sub.add_parser(
        "status", formatter_class=fmt,
        help="what the daemon is doing: a table, or JSON",
        description="On a terminal, a short table: ready (every worker up, not draining), "
                    "the plan (backend, precision, devices, how chosen), queue, images/s "
                    "over the last 10 s, answers, and per stage workers up, queue depth, "
                    "done, errors, restarts. JSON (the whole status document, with `ready`) "
                    "with --json or when stdout is not a terminal. Exit 0 when it answered, "
                    "4 when no daemon did.")
    status.add_argument("--json", action="store_true",
                        help="print the status document as one JSON line, even on a terminal")
    status.add_argument("--endpoint", default=None,
                        help="the daemon's address, ipc://PATH or tcp://HOST:PORT (default: "
                             "$PSPNET_ENDPOINT, else this user's local daemon's ipc socket)")
    status.add_argument("--keys", type=Path, default=None, metavar="DIR", help=KEYS_HELP)
    status.set_defaults(run=run_status)

    reload = sub.add_parser(
        "reload", formatter_class=fmt,
        help="swap the running daemon's model live: no request lost, none refused",
        description="Load a model beside the running one (the daemon starts its workers "
                    "for it; each executor runs one batch first), switch new requests to "
                    "it, and let the old one finish what it holds and stop. Without --model "
                    "the served directory is read again (as SIGHUP does). Every answer "
                    "names its model's version (the manifest's digest). Prints one JSON "
                    "line (version, previous, load_s) and exits 0 once new requests go to "
                    "the new model; if it cannot load or fails its first batch, or has "
                    "other classes without --force, the old model serves on and this exits "
                    "1 with the reason; 4 when no daemon answered.",
        epilog="example: pspnet reload --model models/r50-v2")
    reload.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="a directory made by `pspnet build`, on the daemon's host "
                             "(default: the one it serves, read again)")
    reload.add_argument("--force", action="store_true",
                        help="serve it even if its classes differ from the running model's "
                             "(the running mIoU restarts)")
    reload.add_argument("--endpoint", default=None,
                        help="the daemon's address, ipc://PATH or tcp://HOST:PORT (default: "
                             "$PSPNET_ENDPOINT, else this user's local daemon's ipc socket)")
    reload.add_argument("--keys", type=Path, default=None, metavar="DIR", help=KEYS_HELP)
    reload.add_argument("--timeout", type=positive_float, default=300.0, metavar="S",
                        help="wait this long for the switch (default 300)")
    reload.set_defaults(run=run_reload)

    keys = sub.add_parser(
        "keys", formatter_class=fmt,
        help="write the CurveZMQ keys every tcp socket of the daemon requires",
        description="Write three key pairs into DIR (made 0700; each file 0600; pairs "
                    "already there are kept): server (the daemon), worker (its workers, and "
                    "`pspnet worker` on other hosts) and client (`pspnet submit/status` "
                    "against a tcp --endpoint). Start the daemon with `--keys DIR`; copy "
                    "worker.key_secret and server.key to a worker's host, client.key_secret "
                    "and server.key to a client's, over a channel you trust, and pass them "
                    "`--keys` with the folder they are in. A peer without its key is "
                    "refused at the handshake.",
        epilog="example: pspnet keys /etc/pspnet/keys")
    keys.add_argument("folder", type=Path, metavar="DIR", help="where to write the keys")
    keys.set_defaults(run=run_keys)


def add_pipeline_args(p: argparse.ArgumentParser, *, help: dict[str, str] | None = None,
                      hidden: tuple[str, ...] = ()) -> None:
    """Flags shared by serve, eval, bench and worker: which model, which backend, how many
    workers (declared on PipelineConfig; `help`/`hidden` as in add_flags). Backend and
    precision default to auto, devices to the backend's choice (choose_backend)."""
    add_flags(p, PipelineConfig, PIPELINE_FLAGS, help=help, hidden=hidden)
    p.set_defaults(backend=AUTO, precision=AUTO, devices=None)


def choose_backend(args: argparse.Namespace) -> None:
    """Resolve --backend/--precision auto and unset --devices from the model directory
    (model.artefacts.choose), in `args`; a model that cannot run as asked (a checkpoint
    given as --model, no artefact for the backend, CUDA of a CPU torch) is a usage error:
    one line naming the fix, exit 2, before anything starts. Logged once resolved."""
    from pspnet.model.artefacts import choose, cuda_problem

    if getattr(args, "choice", None) is not None:
        return
    try:
        chosen = choose(args.model_dir, args.backend, args.devices, args.precision)
    except (OSError, ValueError) as exc:
        raise SystemExit(usage_error(args.command, str(exc))) from None
    problem = cuda_problem(chosen.backend, chosen.devices)
    if problem:
        raise SystemExit(usage_error(args.command, problem))
    args.backend, args.devices, args.precision = chosen.backend, chosen.devices, \
        chosen.precision
    args.choice = chosen.why


def pipeline_config(args: argparse.Namespace, **given: object) -> PipelineConfig:
    """The pipeline's config from the shared flags (and `given`), backend chosen, planned
    where flags left worker counts and threads open."""
    choose_backend(args)
    return from_args(PipelineConfig, args, **given)


def backend_problem(cfg: PipelineConfig) -> str | None:
    """Why this backend cannot run these devices, precision and options (None: it can);
    checked before anything binds or starts."""
    try:
        check_backend(cfg.backend, cfg.devices, cfg.precision, cfg.backend_options)
    except ValueError as exc:
        return str(exc)
    return None


def usage_error(command: str, message: str) -> int:
    sys.stderr.write(f"pspnet {command}: error: {message}\n")
    return EXIT_USAGE


def run_serve(args: argparse.Namespace) -> int:
    from pspnet.core.logs import configure_logging
    from pspnet.daemon.server import Server, check_exposure
    from pspnet.model.manifest import Manifest, pick_batch_size

    choose_backend(args)
    try:
        batch = pick_batch_size(Manifest.read(args.model_dir), args.batch_size)
    except (OSError, ValueError) as exc:
        return usage_error("serve", str(exc))
    cfg = pipeline_config(args, batch_size=batch)      # the logged config says what runs
    problem = backend_problem(cfg)
    if problem:
        return usage_error("serve", problem)
    if cfg.tcp_host != "127.0.0.1" and cfg.transport != "tcp":
        return usage_error("serve", "--tcp-host needs --transport tcp")
    if args.watch is not None and not args.watch.is_dir():
        return usage_error("serve", f"--watch {args.watch}: not a directory")
    if args.watch is not None and cfg.out_dir is None:
        return usage_error("serve", "--watch needs --out (the record lives next to the masks)")
    if args.watch is not None and args.watch.resolve() == cfg.out_dir.resolve():
        return usage_error("serve", "--watch and --out are the same folder: every mask would "
                                    "come back in as a new image; give masks their own folder")
    problem = outputs_problem(("--out", cfg.out_dir, True),
                              ("--metrics-json", args.metrics_json, False))
    if problem:
        return usage_error("serve", problem)
    endpoint = args.endpoint or default_endpoint()
    problem = check_exposure(endpoint, tuple(args.allow_roots))
    if problem:
        return usage_error("serve", problem)
    port = parse_endpoint(endpoint).port
    if cfg.transport == "tcp" and port in cfg.tcp_port_range:
        return usage_error("serve", f"--endpoint's port {port} is the internal control port "
                                    f"(--tcp-base-port {cfg.tcp_base_port}); move one of them")
    configure_logging(cfg.log_level, cfg.log_json)
    return Server(from_args(ServeConfig, args, pipeline=cfg, endpoint=endpoint)).serve()


def run_submit(args: argparse.Namespace) -> int:
    from pspnet.daemon.submit import run_submit as run

    return run(args)


def run_keys(args: argparse.Namespace) -> int:
    from pspnet.core.keys import PAIRS, write_keys

    try:
        written = write_keys(args.folder)
    except OSError as exc:
        return usage_error("keys", f"{args.folder}: {exc.strerror or exc}")
    kept = [p for p in PAIRS if not any(w.name.startswith(f"{p}.") for w in written)]
    print_json({"folder": str(args.folder), "written": [str(w) for w in written],
                "kept": kept})
    return 0


def print_json(doc: object) -> None:
    """One JSON line on stdout, flushed at once: a reader sees each answer as it comes."""
    sys.stdout.write(json.dumps(json_safe(doc), default=str) + "\n")
    sys.stdout.flush()


def run_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to swap its model (daemon.reload); the outcome on stdout
    (JSON), a failure's reason on stderr."""
    from pspnet.daemon.client import Client, DaemonUnavailable, ReloadFailed, unavailable_text

    endpoint = args.endpoint or default_endpoint()
    try:
        try:
            client = Client(endpoint, args.keys)
        except ValueError as exc:
            return usage_error("reload", str(exc))
        with client:
            body = client.reload(args.model, args.force, args.timeout)
    except DaemonUnavailable as exc:
        sys.stderr.write(f"pspnet reload: error: {unavailable_text(exc, endpoint)}\n")
        return EXIT_UNAVAILABLE
    except ReloadFailed as exc:
        sys.stderr.write(f"pspnet reload: error: {exc}\n")
        return EXIT_FAILED
    print_json(body)
    return 0


def run_status(args: argparse.Namespace) -> int:
    """The daemon's status: a table on a terminal; else the document as it came, once it
    reads as one (keys a newer daemon added stay in the output)."""
    from pspnet.core.status import Status
    from pspnet.daemon.client import Client, DaemonUnavailable, unavailable_text

    endpoint = args.endpoint or default_endpoint()
    try:
        try:
            client = Client(endpoint, args.keys)
        except ValueError as exc:          # a malformed --endpoint, before any socket
            return usage_error("status", str(exc))
        with client:
            doc = client.status()
    except DaemonUnavailable as exc:
        sys.stderr.write(f"pspnet status: error: {unavailable_text(exc, endpoint)}\n")
        return EXIT_UNAVAILABLE
    try:
        status = Status.from_document(doc)
    except ValueError as exc:
        sys.stderr.write(f"pspnet status: error: {endpoint} answered, but not with a status "
                         f"this version of pspnet reads ({exc}); is it an older daemon?\n")
        return EXIT_FAILED
    if args.json or not sys.stdout.isatty():
        print_json(doc)
    else:
        from pspnet.daemon.status_table import status_table

        print(status_table(status))
    return 0
