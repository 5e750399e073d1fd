#!/usr/bin/env bash
# The device run: PSPNet R50-D8 through the torch backend on one H100/H200, one call.
#
#   bash bench/device/run.sh          (device tool: carry [".whl"], timeout_s 590)
#
# Every step is timed, logged to $OUT/device.log and guarded: a failing or slow step is
# recorded and the next one still runs. A wall-clock budget (BUDGET_S, default 545 s) caps
# each step's timeout so the whole script ends inside the call's limit; steps that no
# longer fit are skipped, most important first. Two plans (PLAN):
#
# PLAN=rewrite (default; issue 16): the same network with less work
#   setup      wheels -> /tmp/site, libturbojpeg, versions, nvidia-smi     ($OUT/env.txt)
#   model      calibrated R50 checkpoint (GPU); two builds with --no-onnx: `plain`
#              (--no-psp-rewrite --no-bn-fold) and `rewrite` (pspnet build's default:
#              BN folded, exact PSP bottleneck rewrite), batch 64 and 128, labels heads
#   reference  strict fp32 (TF32 off) labels of 128 staged photos from the plain build
#   variants   one process per configuration, batch 128 and 64: executor-only img/s and
#              labels agreement with strict fp32 (studies/device/variants.py):
#              default / rewrite / rewrite + fused convs, CUDA graphs (VARIANTS_FIRST)
#   e2e        pspnet bench of the fastest of those                   ($OUT/<card>.json)
#   variants   compile=1,cuda_graphs=1 / compile=1 on the rewrite, then on the plain
#              build (VARIANTS_LATER)                          ($OUT/<card>-variants.json)
#   e2e        pspnet bench of the fastest compiled one
#   cuda-tests pytest tests/stages/test_conv_fusion.py -k cuda (the fused path on a tiny model)
#   report     merge, plot, $OUT/summary.json (also after every step that measures)
#
# PLAN=sweep (issue 6): the batch sweep of the 2026-11-26 H200 run
#   bench      pspnet bench, fp16 + CUDA graphs, batch 32, 64, 16 first     ($OUT/<card>.json/png)
#   agreement  fp32/fp16/bf16 labels vs the fp32 mmseg reference           ($OUT/agreement.json)
#   variant    compile=1 at batch 64 if 100 s are left (under "variants" in the bench JSON)
#   bench      batch 8, 4, 1
#   host-sim   the same pipeline against a simulated 2,500 img/s device: what the host's
#              cores can feed, with no GPU work                          ($OUT/<card>-host-sim.json)
#   cuda-tests pytest tests/stages/test_backends.py -k cuda (carried pytest wheels)
# Knobs (environment): see the block below; studies/device/README.md has the CPU dry run.
set -u
set -a            # every variable below is exported: steps run shell functions in `bash -c`
T0=$(date +%s)
PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/devout}
mkdir -p "$OUT"
LOG=$OUT/device.log
WORK=${WORK:-/tmp/pspnet-device}
rm -rf "$WORK"
mkdir -p "$WORK/parts"
STEPS=$WORK/steps.tsv
: >"$STEPS"

PY=${PY:-python3}
PLAN=${PLAN:-rewrite}                           # rewrite (issue 16) or sweep (issue 6)
CONFIG=${CONFIG:-pspnet_r50-d8_4xb4-20k_voc12aug-512x512}
INPUT_SIZE=${INPUT_SIZE:-500}
DEVICE=${DEVICE:-cuda:0}
PRECISION=${PRECISION:-fp16}
if [[ $PLAN == sweep ]]; then
    BATCH_SIZES=${BATCH_SIZES:-1,4,8,16,32,64}  # built into the model directory
else
    BATCH_SIZES=${BATCH_SIZES:-64,128}
fi
BENCH_FIRST=${BENCH_FIRST-32,64,16}            # benched before the agreement check
BENCH_LATER=${BENCH_LATER-8,4,1}                # after it
SYNTHETIC=${SYNTHETIC:-1024}                    # distinct images, batch >= 16
MIN_IMAGES=${MIN_IMAGES:-2048}                  # e2e images per pass (cycling), batch >= 16,
PASS_BATCHES=${PASS_BATCHES:-64}                # and at least this many batches: fill and
                                                # drain cost ~1.6 batch times per pass (CPU
                                                # sim), so 64 batches keep that near 2.5 %
BASELINE_IMAGES=${BASELINE_IMAGES:-1024}        # executor-only and serial passes, batch >= 16
SMALL_BELOW=${SMALL_BELOW:-16}                  # batch sizes under this take the *_SMALL knobs
SYNTHETIC_SMALL=${SYNTHETIC_SMALL:-256}         # images per pass, batch < 16 (a step is
                                                # ~40 s on an H200, mostly start-up)
REPEATS=${REPEATS:-2}
REPEATS_SMALL=${REPEATS_SMALL:-2}               # batch < 16
PRE_WORKERS=${PRE_WORKERS:-12}
POST_WORKERS=${POST_WORKERS:-4}                 # 1.2-1.3 ms of CPU per image each (CPU
                                                # bench): 1,500 img/s needs 2 busy cores
HEAD=${HEAD:-labels}                            # labels: upsample + argmax on the device
if [[ $DEVICE == cuda* ]]; then
    BACKEND_OPTIONS=${BACKEND_OPTIONS-cuda_graphs=1}
    AGREE_PRECISIONS=${AGREE_PRECISIONS:-fp32,fp16,bf16}
    COMPILE_BATCH=${COMPILE_BATCH-64}           # "" skips the compile variant
else
    BACKEND_OPTIONS=${BACKEND_OPTIONS-}
    AGREE_PRECISIONS=${AGREE_PRECISIONS:-fp32,bf16}
    COMPILE_BATCH=${COMPILE_BATCH-}
fi
AGREE_IMAGES=${AGREE_IMAGES:-64}
AGREE_BATCH=${AGREE_BATCH:-16}
BUDGET_S=${BUDGET_S:-545}                       # the whole script, wall clock (the device
                                                # tool added 28 s to a 505 s call)
RESERVE_S=${RESERVE_S:-20}                      # kept for the final report
BENCH_MAX_S=${BENCH_MAX_S:-130}                 # one batch size's bench
COMPILE_MIN_S=${COMPILE_MIN_S:-100}             # the compile variant runs only with this left
COMPILE_MAX_S=${COMPILE_MAX_S:-170}
COMPILE_OPTIONS=${COMPILE_OPTIONS-compile=1,compile_cache=$WORK/inductor}
                                                # the variant's backend options (the notes'
                                                # torch.compile default mode, no CUDA graphs;
                                                # the executor reuses the bench's compile)
COMPILE_AT=${COMPILE_AT:-before-small}          # before-small: after the agreement, before
                                                # BENCH_LATER; end: after BENCH_LATER
CUDA_TESTS=${CUDA_TESTS-1}                      # "" skips the cuda-tests step
CUDA_TESTS_MAX_S=${CUDA_TESTS_MAX_S:-120}
SIM_IMG_S=${SIM_IMG_S-2500}                     # host-sim step: simulated device speed
SIM_BATCH=${SIM_BATCH:-32}                      # ("" skips the step)
SIM_IMAGES=${SIM_IMAGES:-4096}
SIM_MIN_S=${SIM_MIN_S:-30}
SIM_MAX_S=${SIM_MAX_S:-90}
INSTALL_WHEELS=${INSTALL_WHEELS:-1}
SITE=${SITE:-/tmp/site}
MODELS=${MODELS:-/tmp/models}
BUILD_ARGS=${BUILD_ARGS-}                       # extra `pspnet build` flags
# PLAN=rewrite: configurations, one per line: NAME BUILD OPTIONS [PRECISION], BUILD plain or
# rewrite, OPTIONS a comma list of torch backend options or -; each is measured at every
# VARIANT_BATCHES size (in that order) as one step
VARIANT_BATCHES=${VARIANT_BATCHES:-128,64}
STAGED=${STAGED:-128}                           # staged photos: timing and agreement inputs
REF_BATCH=${REF_BATCH:-16}                      # the strict fp32 reference's batch size
VARIANT_MAX_S=${VARIANT_MAX_S:-60}              # one eager configuration (load, capture,
VARIANT_MIN_S=${VARIANT_MIN_S:-20}              # 3 x 20 timed batches, agreement)
COMPILE_VARIANT_MAX_S=${COMPILE_VARIANT_MAX_S:-120}
COMPILE_VARIANT_MIN_S=${COMPILE_VARIANT_MIN_S:-45}
E2E=${E2E-1}                                    # "" skips the e2e benches of the fastest
E2E_MIN_S=${E2E_MIN_S:-45}
INDUCTOR=$WORK/inductor
if [[ $DEVICE == cuda* ]]; then
    VARIANTS_FIRST=${VARIANTS_FIRST-"default plain cuda_graphs=1
rewrite rewrite cuda_graphs=1
rewrite-fused rewrite cuda_graphs=1,fused_conv=1"}
    VARIANTS_LATER=${VARIANTS_LATER-"rewrite-compile-graphs rewrite compile=1,cuda_graphs=1,compile_cache=$INDUCTOR
rewrite-compile rewrite compile=1,compile_cache=$INDUCTOR
default-compile plain compile=1,compile_cache=$INDUCTOR
default-compile-graphs plain compile=1,cuda_graphs=1,compile_cache=$INDUCTOR
rewrite-fp32 rewrite cuda_graphs=1 fp32"}
else
    VARIANTS_FIRST=${VARIANTS_FIRST-"default plain -
rewrite rewrite -
rewrite-fused-auto rewrite fused_conv=auto"}
    VARIANTS_LATER=${VARIANTS_LATER-"rewrite-compile rewrite compile=1,compile_cache=$INDUCTOR"}
fi

log() { printf '[%s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# step NAME MAX_S MIN_S CMD...: run CMD under `timeout` (whole process group), output into
# the log; the limit is MAX_S or what the budget leaves; skipped when that is under MIN_S.
step() {
    local name=$1 max=$2 min=$3
    shift 3
    (( min > max )) && min=$max
    local avail=$(( $(left) - RESERVE_S ))
    local limit=$(( max < avail ? max : avail ))
    if (( limit < min )); then
        log "SKIP $name: ${avail}s of budget left, needs ${min}s"
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$STEPS"
        return 99
    fi
    log "=== $name (limit ${limit}s): $*"
    local start rc
    start=$(date +%s.%N)
    if declare -F "$1" >/dev/null; then     # a shell function: `timeout` needs a program
        timeout -k 10 "$limit" bash -c "$(declare -f "$1")"'; "$@"' _ "$@" </dev/null 2>&1 \
            | tee -a "$LOG"
    else
        timeout -k 10 "$limit" "$@" </dev/null 2>&1 | tee -a "$LOG"
    fi
    rc=${PIPESTATUS[0]}
    local took
    took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    [[ $rc == 124 || $rc == 137 ]] && log "TIMEOUT $name after ${took}s"
    log "=== $name: rc=$rc in ${took}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >>"$STEPS"
    return "$rc"
}

# ---- setup -----------------------------------------------------------------------------
log "run.sh start: repo $ROOT, OUT $OUT, budget ${BUDGET_S}s, device $DEVICE, config $CONFIG"
{
    echo "## date"; date -u
    echo "## uname"; uname -a
    echo "## cpus"; nproc
    echo "## memory"; free -g 2>/dev/null
    echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "no nvidia-smi"
    echo "## python"; command -v "$PY"; "$PY" -V
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$LOG"

install_wheels() {
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || return 1
    rm -rf "$SITE/tests"        # mmsegmentation's wheel ships a top-level `tests` package
    ls "$SITE"
}
if [[ $INSTALL_WHEELS == 1 ]]; then
    step install-wheels 120 10 install_wheels
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
# PyTurboJPEG finds libturbojpeg with find_library, then fixed paths, then LD_LIBRARY_PATH:
# the carried Debian libturbojpeg0 (libturbojpeg.so.0, needs only libc) is the fallback.
if [[ -f .whl/libturbojpeg/libturbojpeg.so.0 ]]; then
    export LD_LIBRARY_PATH="$ROOT/.whl/libturbojpeg${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
check_imports() {
    "$PY" - <<'EOF'
import importlib, sys
from importlib import metadata
print("python", sys.version.split()[0], sys.executable)
failed = []
for name in ("numpy", "cv2", "PIL", "zmq", "msgpack", "structlog", "watchdog", "turbojpeg",
             "torch", "onnx", "onnxruntime", "matplotlib", "mmengine", "mmcv", "mmseg"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:12s} {getattr(module, '__version__', '?'):14s} {module.__file__}")
    except Exception as exc:
        failed.append(name)
        print(f"  {name:12s} IMPORT FAILED: {type(exc).__name__}: {exc}")
try:
    from turbojpeg import TurboJPEG
    TurboJPEG()
    print("  TurboJPEG() loaded libturbojpeg")
except Exception as exc:
    failed.append("libturbojpeg")
    print(f"  TurboJPEG() FAILED: {exc}")
try:
    import torch
    print("  torch", torch.__version__, "cuda", torch.version.cuda, "available",
          torch.cuda.is_available(), "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"  {p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs,"
              f" capability {p.major}.{p.minor}")
except Exception as exc:
    print("  torch CUDA check failed:", exc)
try:
    from build_model.mmseg_model import import_mmseg
    print("  mmseg via build_model shim:", import_mmseg().__version__)
except Exception as exc:
    failed.append("mmseg-shim")
    print(f"  import_mmseg() FAILED: {type(exc).__name__}: {exc}")
for dist in ("pyzmq", "PyTurboJPEG", "structlog", "watchdog", "mmengine", "mmcv-lite",
             "mmsegmentation", "numpy", "torch", "opencv-python-headless", "onnx"):
    try:
        print(f"  dist {dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"  dist {dist} not installed")
sys.exit(1 if failed else 0)
EOF
}
if ! step check-imports 60 5 check_imports; then
    # no libturbojpeg found through LD_LIBRARY_PATH: register the carried one system-wide
    if [[ -f .whl/libturbojpeg/libturbojpeg.so.0 && $(id -u) == 0 ]] \
        && ! "$PY" -c "from turbojpeg import TurboJPEG; TurboJPEG()" 2>/dev/null; then
        log "registering the carried libturbojpeg.so.0 in /usr/local/lib (ldconfig)"
        cp .whl/libturbojpeg/libturbojpeg.so.0 /usr/local/lib/ && ldconfig
        step check-imports-again 60 5 check_imports
    fi
fi

MACHINE=${MACHINE:-}
if [[ -z $MACHINE ]]; then
    if [[ $DEVICE == cuda* ]] && command -v nvidia-smi >/dev/null; then
        GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
        MACHINE=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | grep -oE '\b(gh|h|b|a|l)[0-9]{2,3}s?\b' | head -1)
        [[ -z $MACHINE ]] && MACHINE=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
    fi
    [[ -z $MACHINE ]] && MACHINE="cpu-$(nproc)core"
fi
log "machine name for the results: $MACHINE"

# ---- model -----------------------------------------------------------------------------
CKPT=$MODELS/checkpoint.pth
MODEL=$MODELS/r50-logits                  # pspnet build's default: BN folded, PSP rewrite
MODEL_LABELS=$MODELS/r50-labels
MODEL_PLAIN=$MODELS/r50-plain-logits      # --no-psp-rewrite --no-bn-fold: mmseg's graph
MODEL_PLAIN_LABELS=$MODELS/r50-plain-labels
mkdir -p "$MODELS"
step checkpoint 150 20 "$PY" studies/device/make_model.py checkpoint --config "$CONFIG" \
    --out "$CKPT" --input-size "$INPUT_SIZE" --device "$DEVICE"

# build_artifacts OUT [FLAGS...]: the torch program + manifest (the build's log has the
# rewrites and the MACs per image; manifest.json's `rewrites` too)
build_artifacts() {
    local out=$1 extra=()
    shift
    read -r -a extra <<<"$BUILD_ARGS"
    "$PY" -m pspnet build --config "$CONFIG" --checkpoint "$CKPT" --out "$out" \
        --batch-sizes "$BATCH_SIZES" --input-size "$INPUT_SIZE" --head logits --no-atc \
        --no-onnx "$@" "${extra[@]}"
}
step artifacts 180 20 build_artifacts "$MODEL"
if [[ $HEAD == labels ]]; then
    step labels-head 30 3 "$PY" studies/device/make_model.py head --src "$MODEL" \
        --out "$MODEL_LABELS" --head labels
    BENCH_MODEL=$MODEL_LABELS
else
    BENCH_MODEL=$MODEL
fi
if [[ $PLAN != sweep ]]; then
    step artifacts-plain 180 20 build_artifacts "$MODEL_PLAIN" --no-psp-rewrite --no-bn-fold
    step labels-head-plain 30 3 "$PY" studies/device/make_model.py head --src "$MODEL_PLAIN" \
        --out "$MODEL_PLAIN_LABELS" --head labels
fi
ls -la "$MODELS" "$MODEL" "$BENCH_MODEL" >>"$LOG" 2>&1

# ---- bench / agreement -----------------------------------------------------------------
# GPU utilisation and power once a second while the benches run (aligned by wall time with
# the log's step lines), appended to the log at the end
DMON_PID=
if [[ $DEVICE == cuda* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi dmon -s pu -d 1 -o T >"$WORK/dmon.txt" 2>&1 &
    DMON_PID=$!
fi
OPTION_FLAGS=()
IFS=',' read -r -a _opts <<<"$BACKEND_OPTIONS"
for o in "${_opts[@]}"; do [[ -n $o ]] && OPTION_FLAGS+=(--backend-option "$o"); done

report() {
    local variants=()
    for d in "$WORK"/variant-*; do [[ -d $d ]] && variants+=(--variant-parts "$d"); done
    "$PY" studies/device/report.py --parts "$WORK/parts" "${variants[@]}" \
        --json "$OUT/$MACHINE.json" --plot "$OUT/$MACHINE.png" --steps "$STEPS" \
        --agreement "$OUT/agreement.json" --summary "$OUT/summary.json" \
        --variants "$OUT/$MACHINE-variants.json" \
        --extra "machine=$MACHINE" --extra "config=$CONFIG" --extra "head=$HEAD" \
        --extra "precision=$PRECISION" --extra "backend_options=$BACKEND_OPTIONS" \
        --extra "elapsed_s=$(( $(date +%s) - T0 ))" --extra "budget_s=$BUDGET_S" >/dev/null
}

# bench_one BS PARTS_DIR MIN_S OPTIONS [MAX_S] [MODEL]: one `pspnet bench` call for one
# batch size, with the torch backend options OPTIONS (comma list, e.g. cuda_graphs=1)
bench_one() {
    local bs=$1 parts=$2 min=$3 options=$4 max=${5:-$BENCH_MAX_S} model=${6:-$BENCH_MODEL}
    local n=$SYNTHETIC repeats=$REPEATS name="bench-bs$bs" min_images=$MIN_IMAGES
    local baseline=$BASELINE_IMAGES
    (( PASS_BATCHES * bs > min_images )) && min_images=$(( PASS_BATCHES * bs ))
    if (( bs < SMALL_BELOW )); then
        n=$SYNTHETIC_SMALL; repeats=$REPEATS_SMALL; min_images=0; baseline=0
    fi
    [[ $parts != "$WORK/parts" ]] && name="$name-$(basename "$parts")"
    mkdir -p "$parts"
    local flags=() opts=()
    IFS=',' read -r -a opts <<<"$options"
    for o in "${opts[@]}"; do [[ -n $o ]] && flags+=(--backend-option "$o"); done
    step "$name" "$max" "$min" \
        "$PY" -m pspnet bench --model "$model" --backend torch --devices "$DEVICE" \
        --precision "$PRECISION" --batch-sizes "$bs" --synthetic "$n" --repeats "$repeats" \
        --min-images "$min_images" --baseline-images "$baseline" \
        --no-masks --preprocess-workers "$PRE_WORKERS" --postprocess-workers "$POST_WORKERS" \
        --machine "$MACHINE" --json "$parts/bs$(printf %03d "$bs").json" "${flags[@]}"
    report
}

compile_variant() {
    # torch.compile costs 15-25 s per process (the bench's own backend and the executor's)
    [[ -n $COMPILE_BATCH ]] && bench_one "$COMPILE_BATCH" "$WORK/variant-compile" \
        "$COMPILE_MIN_S" "$COMPILE_OPTIONS" "$COMPILE_MAX_S"
}

# the host side alone on this machine's cores: the same pipeline against a simulated
# device faster than the goal (no GPU work); steady/exec says how much of it they feed
host_sim() {
    [[ -z $SIM_IMG_S ]] && return 0
    step host-sim "$SIM_MAX_S" "$SIM_MIN_S" \
        "$PY" -m pspnet bench --model "$BENCH_MODEL" --backend sim \
        --backend-option "img_s=$SIM_IMG_S" --batch-sizes "$SIM_BATCH" --synthetic "$SYNTHETIC" \
        --min-images "$SIM_IMAGES" --repeats 1 --warmup 1 --no-masks \
        --preprocess-workers "$PRE_WORKERS" --postprocess-workers "$POST_WORKERS" \
        --machine "$MACHINE-host-sim" --json "$OUT/$MACHINE-host-sim.json"
}

# the CUDA-only tests, which skip on the development machine: launch/collect with pinned
# buffers on two threads, CUDA graphs, fp16/bf16, compile, the fused convolutions, against
# eager on tiny models
cuda_tests() {
    "$PY" -m pytest -q -x -p no:cacheprovider "$@"
}

sweep_plan() {
    IFS=',' read -r -a FIRST <<<"$BENCH_FIRST"
    for bs in "${FIRST[@]}"; do [[ -n $bs ]] && bench_one "$bs" "$WORK/parts" 35 "$BACKEND_OPTIONS"; done

    AGREE_LABELS=()
    [[ $HEAD == labels ]] && AGREE_LABELS=(--labels-model "$MODEL_LABELS")
    step agreement 150 40 "$PY" studies/device/agreement.py --model "$MODEL" "${AGREE_LABELS[@]}" \
        --device "$DEVICE" --precisions "$AGREE_PRECISIONS" --batch-size "$AGREE_BATCH" \
        --images "$AGREE_IMAGES" --json "$OUT/agreement.json" "${OPTION_FLAGS[@]}"
    report

    [[ $COMPILE_AT == before-small ]] && compile_variant

    # the small batch sizes: the issue's table wants all six from one call. On the first H200
    # run (2026-11-26) they came after cuda-tests and host-sim, and the budget ran out at batch 8
    IFS=',' read -r -a LATER <<<"$BENCH_LATER"
    for bs in "${LATER[@]}"; do [[ -n $bs ]] && bench_one "$bs" "$WORK/parts" 35 "$BACKEND_OPTIONS"; done
    [[ $COMPILE_AT == end ]] && compile_variant

    host_sim
    [[ $DEVICE == cuda* && -n $CUDA_TESTS ]] && step cuda-tests "$CUDA_TESTS_MAX_S" 30 \
        cuda_tests tests/stages/test_backends.py -k cuda
}

# ---- PLAN=rewrite: default vs rewrite vs fused, eager graphs vs compiled ----------------
VARIANTS=$WORK/variants
STAGED_NPZ=$WORK/staged.npz
REFERENCE=$WORK/reference.npy

variants_table() {
    "$PY" studies/device/variants.py table --dir "$VARIANTS" --json "$OUT/$MACHINE-variants.json"
}

# measure_variants LINES MAX_S MIN_S: every "NAME BUILD OPTIONS [PRECISION]" line at every
# VARIANT_BATCHES size, one step each
measure_variants() {
    local lines=$1 max=$2 min=$3 bs name build options precision model
    local sizes=()
    IFS=',' read -r -a sizes <<<"$VARIANT_BATCHES"
    while read -r name build options precision; do
        [[ -z $name ]] && continue
        [[ $options == - ]] && options=
        model=$MODEL_LABELS
        [[ $build == plain ]] && model=$MODEL_PLAIN_LABELS
        for bs in "${sizes[@]}"; do
            [[ -z $bs ]] && continue
            step "v-$name-bs$bs" "$max" "$min" "$PY" studies/device/variants.py measure \
                --name "$name" --model "$model" --options "$options" --batch-size "$bs" \
                --precision "${precision:-$PRECISION}" --device "$DEVICE" \
                --staged "$STAGED_NPZ" --reference "$REFERENCE" \
                --json "$VARIANTS/$name-bs$(printf %03d "$bs").json"
            variants_table >/dev/null 2>&1
        done
    done <<<"$lines"
}

# e2e_best MATCH MAX_S: `pspnet bench` of the fastest measured variant whose name matches
e2e_best() {
    local match=$1 max=$2 name bs model options
    [[ -z $E2E ]] && return 0
    read -r name bs model options < <("$PY" studies/device/variants.py best --dir "$VARIANTS" \
        --match "$match")
    if [[ -z ${name:-} ]]; then
        log "e2e: no finished variant matches $match"
        return 0
    fi
    [[ $options == - ]] && options=
    log "e2e: the fastest variant matching $match is $name at batch $bs ($options)"
    bench_one "$bs" "$WORK/variant-e2e-$name" "$E2E_MIN_S" "$options" "$max" "$model"
}

rewrite_plan() {
    mkdir -p "$VARIANTS"
    step stage 60 5 "$PY" studies/device/variants.py stage --images "$STAGED" \
        --input-size "$INPUT_SIZE" --out "$STAGED_NPZ"
    step reference 90 10 "$PY" studies/device/variants.py reference --model "$MODEL_PLAIN_LABELS" \
        --staged "$STAGED_NPZ" --batch-size "$REF_BATCH" --device "$DEVICE" --out "$REFERENCE"
    measure_variants "$VARIANTS_FIRST" "$VARIANT_MAX_S" "$VARIANT_MIN_S"
    e2e_best '^(?!.*compile)' "$BENCH_MAX_S"    # names without "compile"
    measure_variants "$VARIANTS_LATER" "$COMPILE_VARIANT_MAX_S" "$COMPILE_VARIANT_MIN_S"
    e2e_best 'compile' "$COMPILE_MAX_S"
    [[ $DEVICE == cuda* && -n $CUDA_TESTS ]] && step cuda-tests "$CUDA_TESTS_MAX_S" 30 \
        cuda_tests tests/stages/test_conv_fusion.py -k cuda
}

if [[ $PLAN == sweep ]]; then
    sweep_plan
else
    rewrite_plan
fi


# ---- report ----------------------------------------------------------------------------
if [[ -n $DMON_PID ]]; then
    kill "$DMON_PID" 2>/dev/null
    { echo "## nvidia-smi dmon (1 s samples during bench/agreement)"; cat "$WORK/dmon.txt"; } >>"$LOG"
fi
if [[ $PLAN != sweep ]]; then
    log "variants (executor-only img/s, labels vs strict fp32):"
    variants_table 2>&1 | tee -a "$LOG"
fi
report                      # never skipped: it is quick and the summary must exist
log "summary:"
cat "$OUT/summary.json" >>"$LOG" 2>/dev/null
"$PY" - "$OUT/summary.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
s = json.load(open(sys.argv[1]))
for st in s.get("steps", []):
    print(f"  {st['step']:28s} rc={st['rc']:8s} {st['seconds']}s (limit {st['limit_s']})")
for r in s.get("bench", []):
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
    print(f"  bs {r['batch_size']:3d}: e2e {f(r['e2e_img_s'])} img/s (steady "
          f"{f(r.get('e2e_steady_img_s'))}), executor {f(r['executor_img_s'])} (wall "
          f"{f(r['executor_wall_img_s'])}), serial {f(r['serial_img_s'])}, e2e/executor "
          f"{f(r['e2e_over_executor'], 2)} (steady {f(r.get('steady_over_executor'), 2)}), "
          f"p50 {f(r['latency_p50_ms'])} ms, cpu ms/img {r.get('cpu_ms_per_image')}")
for name, rows in (s.get("variants") or {}).items():
    for r in rows:
        print(f"  {name} bs {r['batch_size']}: e2e {r['e2e_img_s']}, executor {r['executor_img_s']}")
for k, v in (s.get("agreement") or {}).items():
    print(f"  agreement {k}: {v}")
EOF
log "run.sh done in $(( $(date +%s) - T0 ))s; files in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
exit 0
