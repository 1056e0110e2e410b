#!/usr/bin/env bash
# One-shot GPU benchmark run: samjax vs official SAM, ViT-B and ViT-H, batch 1 and 8,
# fp32 and bf16, plus the automatic mask generator. Meant for a single call on a fresh
# GPU machine, from the repository root:
#
#   bash benchmarks/gpu_run.sh            # writes to $OUT (or benchmarks/results)
#
# Budget: about 5-6 minutes on an H200, compiles included. A deadline (BENCH_DEADLINE_S,
# default 300 s) stops starting new measurements, so the run ends in time even if
# compilation is slower than expected; whatever finished is in $OUT/results.{json,md}.
# Extra arguments are passed on to `python -m benchmarks`.
set -uo pipefail

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"

# Wheels carried along in .whl/ (e.g. segment_anything) go to a private site dir: no
# index, no dependencies, nothing else on the machine is touched. One at a time, so a
# wheel built for another Python cannot stop segment_anything from being installed.
if compgen -G ".whl/*.whl" > /dev/null; then
  for whl in .whl/*.whl; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$whl" 2>&1 | tee -a "$LOG" \
      || echo "could not install $whl (continuing)" | tee -a "$LOG"
  done
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1

# A real photo for the AMG if one is at hand, else the benchmark synthesizes a scene.
AMG_ARGS=()
for img in "${AMG_IMAGE:-}" shared/images/dog.jpg /work/shared/images/dog.jpg; do
  if [[ -n "$img" && -f "$img" ]]; then
    AMG_ARGS=(--amg-image "$img")
    break
  fi
done

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  2>&1 | tee "$OUT/nvidia-smi.txt" | tee -a "$LOG"

# The upscaled prompt rows are left out here (each costs two more compilations); the
# prompt rows time the decoder's low-res output. Pass --prompt-upscale to add them back.
python3 -m benchmarks --models vit_b,vit_h --batch-sizes 1,8 --dtypes float32,bfloat16 \
  --warmup 2 --no-prompt-upscale --amg ${AMG_ARGS[@]+"${AMG_ARGS[@]}"} \
  --deadline-s "${BENCH_DEADLINE_S:-300}" --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "benchmarks exit code: $rc" | tee -a "$LOG"
exit "$rc"
