#!/usr/bin/env bash
# One visit to a lent GPU: install what is missing, run ours and diffusers side by side, write JSON to $OUT.
#
# Run from the repository root with the diffusers wheels in .whl/ (see benchmarks/README.md):
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
# Phases run in order of importance, each with its own time limit, so a slow one cannot starve the
# rest of the visit's budget (BUDGET seconds in all):
#   A  ours: cold compile, batches 1 and 16, persistent cache filled, one profiled call
#   D  diffusers torch.compile(mode="reduce-overhead")            } concurrently, on disjoint CPU cores:
#   E  ours: bf16-vs-fp32 PSNR and every scheduler's NaN check     } E needs no timing, only answers
#   B  ours: a new process reading the persistent cache (first call from the cache)
#   C  diffusers eager (a reference only: the targets are against D)
# A dry run on a CPU: PRESET=tiny STEPS=2 BUDGET=900 JAX_PLATFORMS=cpu OUT=/tmp/out bash benchmarks/gpu_session.sh
set -u
: "${OUT:?set OUT to the folder the JSON lines go to}"
PRESET=${PRESET:-sd15}
STEPS=${STEPS:-50}
BATCHES=${BATCHES:-"1 16"}
BUDGET=${BUDGET:-585}
ROOT=$(pwd)
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers (pure Python) and what it needs beyond the image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl || exit 1
fi
export PYTHONPATH="$WORK/site:$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $((BUDGET - SECONDS)); }
pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }  # pin CORES CMD...
cap() { local l; l=$(left); echo $(($1 < l ? $1 : (l > 1 ? l : 1))); }  # a phase's limit within the budget

{
  date -u; nproc; grep -m1 "model name" /proc/cpuinfo
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
  python3 -c "import jax, flax, torch, diffusers, transformers; print(jax.__version__, flax.__version__, \
torch.__version__, diffusers.__version__, transformers.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
cd benchmarks
COMMON=(--preset "$PRESET" --steps "$STEPS")

echo "== A ours (cold) $(left)s left"
timeout "$(cap 220)" python3 bench_inpaint.py "${COMMON[@]}" --batch $BATCHES --repeat 3 --cache-dir "$WORK/jaxcache" \
  --profile "$WORK/profile" > "$OUT/A_ours.jsonl" 2> "$OUT/A_ours.log"
echo "rc=$?"; tail -3 "$OUT/A_ours.log"
if ! grep -q '"throughput"' "$OUT/A_ours.jsonl"; then  # e.g. the cuDNN attention path failed: XLA's then
  echo "== A' ours with --attention xla $(left)s left"
  timeout "$(cap 200)" python3 bench_inpaint.py "${COMMON[@]}" --batch $BATCHES --repeat 3 --attention xla \
    --cache-dir "$WORK/jaxcache" > "$OUT/A_ours_xla.jsonl" 2> "$OUT/A_ours_xla.log"
  echo "rc=$?"; tail -3 "$OUT/A_ours_xla.log"
fi
trace=$(ls "$WORK"/profile/plugins/profile/*/*.trace.json.gz 2>/dev/null | head -1)
[ -n "$trace" ] && cp "$trace" "$OUT/A_profile.trace.json.gz"

echo "== D diffusers compile || E ours PSNR and NaN checks $(left)s left"
window=$(($(left) - 60)); [ "$window" -lt 1 ] && window=1  # leave B its minute
cores=$(nproc); split=$((cores * 3 / 4)); [ "$split" -lt 1 ] && split=1
last=$((cores - 1)); [ "$split" -gt "$last" ] && split=$last
pin "0-$((split - 1))" timeout "$window" python3 bench_inpaint_torch.py --mode compile "${COMMON[@]}" \
  --batch $BATCHES --repeat 3 > "$OUT/D_compile.jsonl" 2> "$OUT/D_compile.log" &
d=$!
XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  pin "$split-$last" timeout "$window" python3 bench_inpaint.py "${COMMON[@]}" --batch 1 --no-throughput \
  --psnr --nan-check > "$OUT/E_checks.jsonl" 2> "$OUT/E_checks.log" &
e=$!
wait $d; echo "D rc=$?"; tail -3 "$OUT/D_compile.log"
wait $e; echo "E rc=$?"; tail -3 "$OUT/E_checks.log"

echo "== B ours (persistent cache) $(left)s left"
timeout "$(cap 70)" python3 bench_inpaint.py "${COMMON[@]}" --batch ${BATCHES##* } --repeat 1 \
  --cache-dir "$WORK/jaxcache" > "$OUT/B_cache.jsonl" 2> "$OUT/B_cache.log"
echo "rc=$?"; tail -3 "$OUT/B_cache.log"

echo "== C diffusers eager $(left)s left"
timeout "$(cap 110)" python3 bench_inpaint_torch.py --mode eager "${COMMON[@]}" --batch $BATCHES --repeat 1 \
  > "$OUT/C_eager.jsonl" 2> "$OUT/C_eager.log"
echo "rc=$?"; tail -3 "$OUT/C_eager.log"

cd "$ROOT"
python3 benchmarks/compare.py "$OUT"/A_ours*.jsonl "$OUT"/B_cache.jsonl "$OUT"/C_eager.jsonl "$OUT"/D_compile.jsonl \
  "$OUT"/E_checks.jsonl | tee "$OUT/summary.txt"
echo "done in ${SECONDS}s"
