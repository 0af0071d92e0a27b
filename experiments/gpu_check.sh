#!/usr/bin/env bash
# One prepared check of jattn's speed on a GPU machine (under 8 minutes on one H100):
#   1. python -m jattn.benchmark for configs/ours.py at 224, batch 8: float32 and bfloat16, 1 and
#      5 parallel folds, plus the fused S-Attn in bfloat16 (is it faster than the explicit?), and
#      plain VGG19 in float32 with the PyTorch eager peer for the ratio;
#   2. one epoch of configs/ours.py (fold 1, from scratch) on a synthetic tree with BreakHis'
#      7,909 images, through the command line a user runs;
# then a summary table, printed last. Everything is written under the folder given as $1.
#
#   PYTHONPATH=$PWD bash experiments/gpu_check.sh OUT            # from the repository root
#   SIZE=small PYTHONPATH=$PWD bash experiments/gpu_check.sh OUT # CPU, seconds (the test suite)
#   EXTRA_BENCH=0 ...: only the benchmark of configs/ours.py (no fused S-Attn, no VGG19 rows)
#
# SIZE=small runs the same steps at 32x32 with VGG19's widths / 16 and a 16-patient tree, so the
# script is exercised on every test run. It installs nothing: jattn's dependencies must be there.
set -euo pipefail

OUT=${1:?usage: bash experiments/gpu_check.sh OUT_FOLDER}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
THREADS=${THREADS:-$(nproc)}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}

if [[ "${SIZE:-full}" == small ]]; then
  MODEL=(--config.model.width=0.0625 --config.model.classifier_width=16
         --config.model.pool_size=1)
  BENCH=(--image-size 32 --steps 1 --windows 1 --warmup 1)
  BENCH_DTYPES=float32 BENCH_FOLDS=1,2 EXTRA_BENCH=0
  SYNTH=(--images-per-patient 1 --width 48 --height 32 --no-junk --odd-sizes 0)
  EPOCH=(--config.image_size=32 --config.batch_size=8 --config.log_every_steps=2)
else
  MODEL=()
  BENCH=(--image-size 224 --steps 10 --windows 5 --warmup 3)
  BENCH_DTYPES=float32,bfloat16 BENCH_FOLDS=1,5 EXTRA_BENCH=${EXTRA_BENCH:-1}
  # Images are resized to 224 once and cached, so a smaller PNG only shortens the generation.
  SYNTH=(--counts real --width 350 --height 230 --threads "$THREADS")
  EPOCH=(--config.image_size=224 --config.batch_size=8 --config.log_every_steps=50)
fi

stamp() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }

stamp "benchmark: configs/ours.py, $BENCH_DTYPES, parallel folds $BENCH_FOLDS"
"$PY" -m jattn.benchmark --configs configs/ours.py --dtype "$BENCH_DTYPES" \
  --parallel-folds "$BENCH_FOLDS" --torch "${BENCH[@]}" "${MODEL[@]}" \
  --out "$OUT/bench_ours.json" | tee "$OUT/bench_ours.txt"
if [[ "$EXTRA_BENCH" == 1 ]]; then
  stamp "benchmark: configs/ours.py in bfloat16 with the fused S-Attn"
  "$PY" -m jattn.benchmark --configs configs/ours.py --dtype bfloat16 \
    --config.model.s_attn_impl=fused "${BENCH[@]}" \
    --out "$OUT/bench_ours_fused.json" | tee "$OUT/bench_ours_fused.txt"
  stamp "benchmark: configs/vgg19.py, float32, with PyTorch"
  "$PY" -m jattn.benchmark --configs configs/vgg19.py --dtype float32 --torch "${BENCH[@]}" \
    --out "$OUT/bench_vgg19.json" | tee "$OUT/bench_vgg19.txt"
fi

stamp "synthetic BreakHis tree"
DATA="$OUT/breakhis"
if [[ ! -d "$DATA/BreaKHis_v1" ]]; then
  "$PY" -m jattn.data synthesize --out "$DATA" "${SYNTH[@]}" > "$OUT/synthesize.txt"
fi

stamp "one epoch of configs/ours.py, fold 1, from scratch"
started=$(date +%s)
"$PY" -m jattn.main --config configs/ours.py --config.data_dir="$DATA" \
  --config.prepared_dir="$OUT/prepared" --config.pretrained='' --config.num_epochs=1 \
  --config.fold=1 "${EPOCH[@]}" "${MODEL[@]}" --workdir "$OUT/epoch" \
  > "$OUT/epoch.txt" 2>&1 || { tail -20 "$OUT/epoch.txt"; exit 1; }
echo $(( $(date +%s) - started )) > "$OUT/epoch_wall_s.txt"

stamp "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
"""The check's figures in one table: benchmark rows, then the epoch run."""
import glob
import json
import os
import statistics
import sys

from jattn import benchmark

out = sys.argv[1]
rows, device = [], None
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
  with open(path) as f:
    result = json.load(f)
  device = result["device"]
  rows += result["rows"]
print(f"device: {device['device_kind']} ({device['backend']}), jax {device['jax']}")
print(benchmark.format_table(rows))

with open(os.path.join(out, "epoch", "results.json")) as f:
  results = json.load(f)
with open(os.path.join(out, "epoch", "metrics.jsonl")) as f:
  windows = [json.loads(line) for line in f if line.strip()]
with open(os.path.join(out, "epoch_wall_s.txt")) as f:
  wall = int(f.read())
rates = [w["images_per_second"] for w in windows[1:]] or [windows[0]["images_per_second"]]
train = results["train"]
print(f"one epoch of configs/ours.py: {results['data']['num_train_images']} training images, "
      f"{train['steps']} steps; {statistics.median(rates):.1f} images/s (median of "
      f"{len(rates)} logged windows after the first, which holds compilation); training and "
      f"test {train['wall_time_this_session_s']:.0f} s; whole command {wall} s with preparation")
EOF
