#!/usr/bin/env bash
# The GPU speed and memory check (issue 17), one script, under 10 minutes on one H100 / H200. Each
# stage is `scripts/bench.py train` (our training against the diffusers-style reference loop, in one
# process, random-weight models of the named architecture): images/s, MFU, peak memory, ratio.
#
#   sd15_b8     SD1.5, 512 px, LoRA, bf16, batch 8: the defaults, then model.compile=true (regional),
#               model.channels_last=true and trainer.precision=32-true (frozen weights in float32:
#               the memory bf16 saves), each on its own
#   sd15_b32    the same at batch 32: the defaults
#   sdxl_1024   SDXL, 1024 px, LoRA, bf16, batch 1, gradient checkpointing (both runs): the defaults,
#               then without checkpointing (its memory peak)
#
# On the GPU machine (python3 with torch, lightning, transformers; no network), from the repository
# root with the git-ignored wheel folder .whl/ carried, made here once:
#
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         diffusers==<.venv's> hydra-core==<…> omegaconf==<…> antlr4-python3-runtime==4.9.3 peft==<…>
#     bash scripts/gpu_bench.sh                 # results under $OUT (default /tmp/gpu-bench)
#
# DRY=1 bash scripts/gpu_bench.sh runs the same stages on the CPU with the tiny model and two timed
# steps each (about five minutes here): a check of the script, not a measurement.
set -uo pipefail

OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -z "${DRY:-}" ]; then
    SITE=/tmp/site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
    SD15=(--model sd15 --resolution 512)
    SDXL=(--model sdxl --resolution 1024)
    RUN=(--precision bf16-mixed --device cuda --workers 4)
    SHORT=()
else
    export PYTHONPATH="$PWD"
    SD15=(--model tiny)
    SDXL=(--model tiny)
    RUN=(--precision 32-true --device cpu)
    SHORT=(--steps 2 --warmup 1)  # last on the line: argparse keeps the last value
fi
"$PYTHON" -c 'import sys, torch, diffusers, transformers, peft, lightning, hydra
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "lightning", lightning.__version__, "hydra", hydra.__version__)' |
    tee -a "$OUT/env.txt"

status=0
# stage NAME SECONDS ARGS...: one bench run, bounded, its table in NAME.log and NAME.json.
stage() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PYTHON" scripts/bench.py train "$@" "${SHORT[@]}" --json "$OUT/$name.json" 2>&1 |
        tee "$OUT/$name.log"
    local code=${PIPESTATUS[0]}
    echo "$name: exit $code" | tee -a "$OUT/summary.txt"
    [ "$code" -eq 0 ] || status=$code
}

stage sd15_b8 230 "${SD15[@]}" "${RUN[@]}" --batch-size 8 --warmup 10 --steps 60 \
    --also model.compile=true --also model.channels_last=true --also trainer.precision=32-true
stage sd15_b32 90 "${SD15[@]}" "${RUN[@]}" --batch-size 32 --warmup 5 --steps 20
stage sdxl_1024 240 "${SDXL[@]}" "${RUN[@]}" --batch-size 1 --warmup 5 --steps 20 --gradient-checkpointing \
    --also model.gradient_checkpointing=false

"$PYTHON" scripts/bench_report.py "$OUT"/*.json | tee -a "$OUT/summary.txt"
[ -n "${DRY:-}" ] || nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv | tee -a "$OUT/env.txt"
exit "$status"
