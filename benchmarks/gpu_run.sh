#!/usr/bin/env bash
# One-shot GPU benchmark run, samjax vs the official SAM in the same processes, sized for
# a short lease on a fresh GPU machine (run from the repository root):
#
#   BENCH_BUDGET_S=330 bash benchmarks/gpu_run.sh      # writes to $OUT (or benchmarks/results)
#
# Stages, each a `python -m benchmarks` run with its own time limit, most important first:
#   1. vit_h: ViT-H encoder, batch 8, bf16, one row per attention variant in $H_IMPLS,
#      each traced for a kernel-time breakdown; the dense matmul peak for MFU; XLA's
#      optimized HLO of each variant is kept. The fastest variant is then exported as
#      SAMJAX_ATTENTION_IMPL, which is what "auto" uses in the later stages.
#   2. amg: the automatic mask generator on ViT-B ($AMG_DTYPES, default bfloat16, at
#      $AMG_SETTINGS, default the official thresholds; AMG=0 skips it: its first call
#      compiles for 1-2 minutes).
#   3. vit_b: ViT-B encoder at batch 8 and 1 in bf16 and fp32, and the prompt path.
#   4. bulk: `samjax automask` against the official scripts/amg.py end to end on a folder
#      (benchmarks/bulk_throughput.py; $BULK_RUNS, default ViT-B 32x32 at the official
#      thresholds on 8 images; samjax in $BULK_DTYPES, default bfloat16 (what --dtype
#      auto picks; each dtype compiles cold for 1-2 minutes), amg.py in fp32; BULK=0
#      skips it). amg.py is not in the segment_anything wheel: put it at .whl/amg.py
#      (carried with the wheels) or name it in $SAMJAX_OFFICIAL_AMG.
# Each stage only starts if enough of BENCH_BUDGET_S (default 330 s) is left, and is
# stopped (SIGINT, then SIGKILL) before the budget runs out; every stage saves its JSON and
# markdown after each row, so what finished is kept. At the end everything is packed into
# $OUT/results.tar.gz, with the stages' results.md and the log beside it.
set -uo pipefail

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
BUDGET="${BENCH_BUDGET_S:-330}"
T0=$SECONDS
left() { echo $(( BUDGET - (SECONDS - T0) )); }

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

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  2>&1 | tee "$OUT/nvidia-smi.txt" | tee -a "$LOG"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, \
jax.devices())" 2>&1 | tee -a "$LOG"

# stage NAME MIN_SECONDS MAX_SECONDS ARGS...: runs if MIN_SECONDS are left; is stopped
# after MAX_SECONDS (or 15 s before the budget ends) and starts no new measurement after
# 65% of that.
stage() {
  local name=$1 need=$2 max=$3; shift 3
  local l; l=$(left)
  if (( l < need )); then
    echo "=== stage $name skipped: ${l}s left, needs ${need}s" | tee -a "$LOG"
    return
  fi
  local lim=$(( l - 15 < max ? l - 15 : max ))
  echo "=== stage $name (${l}s left, up to ${lim}s)" | tee -a "$LOG"
  timeout -s INT -k 10 "$lim" python3 -m benchmarks "$@" --out "$OUT/$name" \
    --deadline-s $(( lim * 65 / 100 )) 2>&1 | tee -a "$LOG"
  echo "=== stage $name exit code ${PIPESTATUS[0]}" | tee -a "$LOG"
}

XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/xla_dump --xla_dump_hlo_as_text \
--xla_dump_hlo_module_re=.*lambda.*" \
stage vit_h 150 "${H_MAX_S:-240}" --models vit_h --batch-sizes 8 --dtypes bfloat16 \
  --attention-impl "${H_IMPLS:-fold/fold_mla,auto,fold,cudnn/fold_mla,fold/cudnn,fold_mla}" \
  --sections encoder --profile --peak on --warmup 2 --iters 8

# The fastest ViT-H variant becomes "auto" for the later stages (SAMJAX_ATTENTION_IMPL).
BEST=$(python3 - "$OUT/vit_h/results.json" <<'PY' 2>/dev/null
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["encoder"] if r.get("samjax")]
best = max(rows, key=lambda r: r["samjax"]["images_per_s"])
print(best["attention"]["requested"])
PY
)
if [[ -n "$BEST" && "$BEST" != auto ]]; then
  export SAMJAX_ATTENTION_IMPL="$BEST"
fi
echo "=== fastest ViT-H attention variant: ${BEST:-unknown}" | tee -a "$LOG"

if [[ "${AMG:-1}" == 1 ]]; then
  AMG_ARGS=()
  for img in "${AMG_IMAGE:-}" shared/images/dog.jpg; do
    if [[ -n "$img" && -f "$img" ]]; then AMG_ARGS=(--amg-image "$img"); break; fi
  done
  stage amg 100 "${AMG_MAX_S:-130}" --models vit_b --sections none --amg --peak off \
    --amg-dtypes "${AMG_DTYPES:-bfloat16}" --amg-settings "${AMG_SETTINGS:-defaults}" \
    --amg-iters 2 ${AMG_ARGS[@]+"${AMG_ARGS[@]}"}
fi
stage vit_b 60 "${B_MAX_S:-120}" --models vit_b --batch-sizes 8,1 --dtypes bfloat16,float32 \
  --peak on --warmup 2 --iters 10 --no-prompt-upscale

if [[ "${BULK:-1}" == 1 ]]; then
  l=$(left)
  if (( l < 90 )); then
    echo "=== stage bulk skipped: ${l}s left, needs 90s" | tee -a "$LOG"
  else
    lim=$(( l - 15 < ${BULK_MAX_S:-240} ? l - 15 : ${BULK_MAX_S:-240} ))
    echo "=== stage bulk (${l}s left, up to ${lim}s)" | tee -a "$LOG"
    # Results are saved after each row, so a stop at the limit keeps the finished rows.
    timeout -s INT -k 10 "$lim" python3 -m benchmarks.bulk_throughput --torch-device cuda \
      --runs ${BULK_RUNS:-vit_b:32:defaults:8} --dtypes "${BULK_DTYPES:-bfloat16}" \
      --out "$OUT/bulk" 2>&1 | tee -a "$LOG"
    echo "=== stage bulk exit code ${PIPESTATUS[0]}" | tee -a "$LOG"
  fi
fi

# Pack: optimized HLO of the encoder variants, traces and every stage's outputs.
mkdir -p "$OUT/hlo"
find /tmp/xla_dump -name '*after_optimizations.txt' -size +100k -exec cp {} "$OUT/hlo/" \; \
  2>/dev/null
for s in vit_h vit_b amg bulk; do
  [[ -f "$OUT/$s/results.md" ]] && cp "$OUT/$s/results.md" "$OUT/$s.md"
done
(cd "$OUT" && tar czf results.tar.gz --exclude=results.tar.gz vit_h vit_b amg bulk hlo \
  2>/dev/null; rm -rf vit_h vit_b amg bulk hlo)
ls -la "$OUT" | tee -a "$LOG"
echo "total ${SECONDS}s" | tee -a "$LOG"
