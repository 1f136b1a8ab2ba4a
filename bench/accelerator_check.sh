#!/usr/bin/env bash
# The accelerator table of the README, on one GPU, in one command (about 8 minutes on an H200):
#
#   bench/accelerator_check.sh [OUT_DIR]
#
# Needs jax (CUDA), flax, optax, ml-collections, torch and transformers; no TensorFlow (the train
# step imports none). Runs, each in its own process so each peak-memory figure is its own:
#   1. attention forward + backward per implementation at every MAE shape (bench_attention.py);
#   2. mae_b 448 x 448 x 12, batch 64: mae_jax device-resident and host-fed, PyTorch eager, and a
#      device-time profile of the step;
#   3. mae_b at the ImageNet shape 224 x 224 x 3, batch 256, beside PyTorch eager;
#   4. poster, mae_l and mae_h at 448 x 448 x 12 (remat 'auto': only where memory needs it);
#   5. PyTorch's torch.compile of the flagship, last, as it may take minutes to compile.
# Writes OUT_DIR/results.jsonl, OUT_DIR/attention.jsonl, one log per run and OUT_DIR/table.md.
# EXPLORE=1 first times other cuDNN paddings and Pallas' kernel at 448 px and runs every step
# with the flags those timings favour (bench_attention.py --suggest; printed, and in the logs).
# A run that fails or overruns its time limit is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-accelerator_check}
mkdir -p "$out"
py=${PYTHON:-python3}
# Extra bench_step.py flags for every run, e.g. BENCH_ARGS='--steps 20 --repeats 5'.
read -r -a extra <<<"${BENCH_ARGS:-}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

{
  date -u '+%Y-%m-%d %H:%M UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$py" - <<'PY'
import importlib
names = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers')
versions = []
for name in names:
  try:
    versions.append(f'{name} {importlib.import_module(name).__version__}')
  except ImportError:
    versions.append(f'{name} missing')
try:
  from jax._src.lib import cuda_versions
  versions.append(f'cudnn {cuda_versions.cudnn_get_version()}')
except Exception:  # pylint: disable=broad-except
  pass
print(', '.join(versions))
PY
} | tee "$out/environment.txt"

run() {  # run NAME SECONDS ARGS...: one bench_step.py run with its own log and time limit.
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$py" bench/bench_step.py --json "$out/results.jsonl" --label "$name" "$@" \
    "${extra[@]}" >"$out/$name.log" 2>&1
  local rc=$?
  grep -E '^(preset|model|jax|torch|  )' "$out/$name.log"
  [ $rc -eq 0 ] || { echo "   $name failed (exit $rc; 124 = over its ${limit} s); last lines:"; tail -n 5 "$out/$name.log"; }
}

if [ "${EXPLORE:-0}" = 1 ]; then
  echo "== explore"
  timeout 90 "$py" bench/bench_attention.py --explore --shapes 'decoder 448,mae_b encoder 448' \
    --suggest --json "$out/explore.jsonl" 2>&1 | tee "$out/explore.log" | grep -v '^WARNING'
  suggested=$(sed -n 's/^suggested bench_step.py flags: //p' "$out/explore.log")
  read -r -a chosen <<<"$suggested"
  extra+=("${chosen[@]}")
  echo "   every run below adds: ${extra[*]}"
fi

echo "== attention"
timeout 120 "$py" bench/bench_attention.py --json "$out/attention.jsonl" 2>&1 | tee "$out/attention.log" \
  | grep -v '^WARNING'
run mae_b_448 240 --preset mae_b --batch 64 --host_fed --torch eager --profile_steps 3
run mae_b_224x3 180 --preset mae_b --batch 256 --image_size 224 --channels 3 --torch eager
run poster_448 150 --preset poster --batch 64 --torch none
run mae_l_448 180 --preset mae_l --batch 64 --torch none
run mae_h_448 180 --preset mae_h --batch 64 --torch none
run mae_b_448_torch_compile 150 --preset mae_b --batch 64 --skip_jax --torch compile

"$py" bench/accelerator_table.py "$out/results.jsonl" | tee "$out/table.md"
