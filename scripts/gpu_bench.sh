#!/usr/bin/env bash
# Issue 7's GPU check: SD1.5-architecture LoRA (random weights) at 512 px, bf16-mixed, batch 8 —
# our training with and without the latent cache against the reference loop: images/s, MFU, peak
# memory, ratio. For the lent GPU machine (python3 with torch, lightning, peft, transformers; no
# network): run from the repository root with the git-ignored wheel folder .whl/ carried
# (diffusers, hydra-core, omegaconf, antlr4-python3-runtime and peft at the .venv's versions):
#
#     bash scripts/gpu_bench.sh          # results under $OUT (default /tmp/gpu-bench): JSON + log
#
# Takes about 5 minutes on an H100; every step is bounded so the whole script stays under 9.
set -uo pipefail

OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
    exit 1
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, diffusers, transformers, peft, lightning, hydra
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "lightning", lightning.__version__, "hydra", hydra.__version__)'
} 2>&1 | tee "$OUT/env.txt"

SETUP=(--model sd15 --resolution 512 --batch-size 8 --precision bf16-mixed --device cuda --steps 100 --warmup 10 --workers 4)
# Ours without and with data.cache=memory, then the reference, in one process (one model build).
timeout 300 python3 scripts/bench.py train "${SETUP[@]}" --cache --json "$OUT/sd15_512_b8_bf16.json" 2>&1 |
    tee "$OUT/bench.log"
status=$?
if [ "$status" -ne 0 ]; then
    # Something in the cached run (or a timeout) lost the table: still get ours-vs-reference without it.
    echo "first run exited with $status; again without --cache" | tee -a "$OUT/bench.log"
    timeout 200 python3 scripts/bench.py train "${SETUP[@]}" --steps 50 --json "$OUT/sd15_512_b8_bf16_nocache.json" \
        2>&1 | tee "$OUT/bench_nocache.log"
    status=$?
fi
# torch.compile of the U-Net (model.compile=true): compile time, then the compiled speed.
timeout 240 python3 scripts/bench.py train "${SETUP[@]}" --steps 60 --set model.compile=true \
    --json "$OUT/sd15_512_b8_bf16_compile.json" 2>&1 | tee "$OUT/bench_compile.log"
nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv | tee -a "$OUT/env.txt"
exit "$status"
