#!/usr/bin/env bash
# The one prepared check of jattn's speed for a lent GPU, in at most BUDGET_S (300) seconds. In
# this order, each stage writing its JSON into OUT as it finishes (a stage that fails or runs out
# of time is recorded in OUT/stages.json and the next one runs):
#   1. profile.json          where a bfloat16 training step of configs/ours.py (224, batch 8) goes,
#                            by kind of op, from a jax.profiler trace (jattn benchmark
#                            --profile; the trace itself stays in WORK/trace)
#   2. roofline.json         the step's roofline bound (FLOPs and bytes at the device's peaks) and
#                            the measured fraction of it
#   3. peers.json            jattn beside PyTorch eager, channels-last and compiled, in bfloat16
#                            autocast
#   4. dispatch.json         1 and 8 steps per dispatch (lax.scan)
#   5. runs_per_device.json  the aggregate rate of 1, 2 and 4 benchmark processes on the GPU
#   6. vit.json              ViT-S/14 (configs/vit_s14.py) and ViT-L/16 (configs/uni.py) beside
#                            timm's PyTorch eager, in bfloat16 autocast
#   7. epoch.json            one epoch of configs/ours.py on a synthetic BreakHis-size tree through
#                            jattn train (8 steps per dispatch), only if 150 s are left
# then summary.txt, printed last. At most 9 files go into OUT; the trace, the synthetic data and
# the caches go into WORK (default: a new folder under /tmp).
#
#   PYTHONPATH=$PWD bash experiments/gpu_check.sh OUT [WORK]          # from the repository root
#   SIZE=small PYTHONPATH=$PWD bash experiments/gpu_check.sh OUT     # CPU, tiny (the test suite)
#
# SIZE=small runs every stage on a 32x32 model of VGG19's widths / 16 in float32, the roofline at
# nominal peaks (1 TFLOP/s, 50 GB/s), the compiled peer with torch.compile's aot_eager backend
# (inductor's C++ build takes minutes on a CPU), 1 and 2 runs per device and a 16-patient tree,
# so the script is exercised on every test run (tests/test_benchmark.py). It
# installs nothing: jattn's dependencies (and PyTorch) must be there.
set -uo pipefail

OUT=${1:?usage: bash experiments/gpu_check.sh OUT_FOLDER [WORK_FOLDER]}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${2:-$(mktemp -d /tmp/jattn-gpu-check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
PY=${PYTHON:-python}
THREADS=${THREADS:-$(nproc)}
BUDGET_S=${BUDGET_S:-300}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/xla_cache}
START=$(date +%s)

if [[ "${SIZE:-full}" == small ]]; then
  MODEL=(--config.model.width=0.0625 --config.model.classifier_width=16
         --config.model.pool_size=1)
  BENCH=(--image-size 32 --steps 1 --windows 2 --warmup 1)
  VIT=(--image-size 112 --config.model.vit.depth=2 --config.model.vit.embed_dim=96
       --config.model.vit.num_heads=2)  # 112: whole patches of 14 and of 16, as timm needs
  # Nominal peaks for the roofline's arithmetic (the CPU has no entry in roofline.DEVICES); 16
  # traced steps, so that the start of the trace is a small part of its window.
  ROOF=(--peak-tflops 1 --peak-gbps 50) PROFILE_STEPS=16
  DTYPE=float32 RUNS=1,2 COMPILE_BACKEND=aot_eager EPOCH_NEEDS_S=0
  SYNTH=(--images-per-patient 1 --width 48 --height 32 --no-junk --odd-sizes 0)
  EPOCH=(--config.image_size=32 --config.batch_size=8 --config.log_every_steps=2
         --config.bootstrap_resamples=0)
else
  MODEL=()
  BENCH=(--image-size 224 --steps 10 --windows 5 --warmup 3)
  VIT=()
  ROOF=() PROFILE_STEPS=10
  DTYPE=bfloat16 RUNS=1,2,4 COMPILE_BACKEND=inductor EPOCH_NEEDS_S=150
  # Images are resized to 224 once and cached, so a smaller PNG only shortens the generation.
  SYNTH=(--counts real --width 350 --height 230 --threads "$THREADS")
  EPOCH=(--config.image_size=224 --config.batch_size=8 --config.log_every_steps=50)
fi
: > "$WORK/stages.tsv"

stamp() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# stage NAME LIMIT_S COMMAND...: runs COMMAND (its output in WORK/NAME.log) for at most LIMIT_S
# and what is left of the budget; records its status and seconds.
stage() {
  local name=$1 limit=$2 t0 status budget
  shift 2
  budget=$(left)
  (( budget < limit )) && limit=$budget
  if (( limit < 10 )); then
    stamp "$name: skipped, $budget s left"
    printf '%s\tskipped\t0\n' "$name" >> "$WORK/stages.tsv"
    return
  fi
  stamp "$name (at most $limit s)"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  status=$?
  if (( status == 124 || status == 137 )); then
    status=timeout
  elif (( status != 0 )); then
    status="exit $status"
  else
    status=ok
  fi
  [[ $status == ok ]] || { stamp "$name: $status"; tail -5 "$WORK/$name.log" >&2; }
  printf '%s\t%s\t%s\n' "$name" "$status" $(( $(date +%s) - t0 )) >> "$WORK/stages.tsv"
}

BENCH_CMD=("$PY" -m jattn benchmark --configs configs/ours.py --dtype "$DTYPE" "${BENCH[@]}"
           "${MODEL[@]}")
stage profile 90 "${BENCH_CMD[@]}" --steps "$PROFILE_STEPS" --profile "$WORK/trace" \
  --out "$OUT/profile.json"
stage roofline 60 "${BENCH_CMD[@]}" --roofline "${ROOF[@]}" --out "$OUT/roofline.json"
stage peers 120 "${BENCH_CMD[@]}" --torch --torch-mode eager,channels_last,compile \
  --torch-compile-backend "$COMPILE_BACKEND" --out "$OUT/peers.json"
stage dispatch 75 "${BENCH_CMD[@]}" --steps-per-dispatch 1,8 --out "$OUT/dispatch.json"
stage runs_per_device 75 "${BENCH_CMD[@]}" --runs-per-device "$RUNS" \
  --out "$OUT/runs_per_device.json"
stage vit 75 "$PY" -m jattn benchmark --configs configs/vit_s14.py,configs/uni.py --dtype "$DTYPE" \
  "${BENCH[@]}" "${VIT[@]}" --torch --out "$OUT/vit.json"

if (( $(left) >= EPOCH_NEEDS_S )); then
  DATA="$WORK/breakhis"
  [[ -d "$DATA/BreaKHis_v1" ]] || stage synthesize "$(left)" "$PY" -m jattn data synthesize \
    --out "$DATA" "${SYNTH[@]}"
  t0=$(date +%s)
  stage epoch "$(left)" "$PY" -m jattn.main --config configs/ours.py \
    --config.data.dir="$DATA" --config.data.prepared_dir="$WORK/prepared" --config.pretrained='' \
    --config.num_epochs=1 --config.fold=1 --config.steps_per_dispatch=8 "${EPOCH[@]}" \
    "${MODEL[@]}" --workdir "$WORK/epoch"
  [[ -f "$WORK/epoch/results.json" ]] && "$PY" - "$WORK/epoch" $(( $(date +%s) - t0 )) \
    "$OUT/epoch.json" <<'EOF'
"""The epoch's figures: images, steps, the logged rates (median after the first window, which
holds compilation) and the wall time, into epoch.json."""
import json
import os
import statistics
import sys

from jattn.core import files

workdir, wall, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(os.path.join(workdir, "results.json")) as f:
  results = json.load(f)
with open(os.path.join(workdir, "metrics.jsonl")) as f:
  windows = [json.loads(line) for line in f if line.strip()]
rates = [w["images_per_second"] for w in windows[1:]] or [windows[0]["images_per_second"]]
files.atomic_write_text(out, json.dumps({
    "train_images": results["data"]["num_train_images"], "steps": results["train"]["steps"],
    "layout": results["layout"], "median_images_per_s": statistics.median(rates),
    "logged_windows": len(rates), "train_and_test_s": results["train"]["wall_time_this_session_s"],
    "command_s_without_synthesis": wall}, indent=2) + "\n")
EOF
else
  stamp "epoch: skipped, $(left) s left"
  printf '%s\tskipped\t0\n' epoch >> "$WORK/stages.tsv"
fi

stamp "summary"
"$PY" - "$OUT" "$WORK/stages.tsv" $(( $(date +%s) - START )) <<'EOF' | tee "$OUT/summary.txt"
"""The check's figures in one report: the stages, then each stage's table, the epoch last."""
import json
import os
import sys

from jattn.core import files
from jattn.perf import benchmark, runs_per_device

out, stages_file, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(stages_file) as f:
  stages = [dict(zip(("stage", "status", "seconds"), line.rstrip("\n").split("\t"), strict=True))
            for line in f if line.strip()]
for s in stages:
  s["seconds"] = int(s["seconds"])
files.atomic_write_text(os.path.join(out, "stages.json"),
                        json.dumps({"stages": stages, "total_s": total}, indent=2) + "\n")
print("stages: " + ", ".join(f"{s['stage']} {s['status']} ({s['seconds']} s)" for s in stages)
      + f"; {total} s in all")
eval_rate = None
for name in ("profile", "roofline", "peers", "dispatch", "runs_per_device", "vit"):
  path = os.path.join(out, f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    print(f"--- {name}")
    print((runs_per_device.report if "runs_per_device" in result else benchmark.report)(result))
    eval_rate = eval_rate or next((r["eval_images_per_s"] for r in result.get("rows", ())
                                   if r.get("eval_images_per_s")), None)
    if name == "runs_per_device" and eval_rate:
      best = max(result["runs_per_device"], key=lambda r: r["aggregate_train_images_per_s"])
      hours = benchmark.projected_hours(best["aggregate_train_images_per_s"], eval_rate)
      print(f"paper protocol at the best aggregate rate ({best['processes']} runs per device; "
            f"this config's rate for every row, an upper bound): {hours:.2f} h")
path = os.path.join(out, "epoch.json")
if os.path.exists(path):
  with open(path) as f:
    e = json.load(f)
  print(f"one epoch of configs/ours.py: {e['train_images']} training images, {e['steps']} steps "
        f"({e['layout']['steps_per_dispatch']} per dispatch); {e['median_images_per_s']:.1f} "
        f"images/s (median of {e['logged_windows']} logged windows after the first, which holds "
        f"compilation); training and test {e['train_and_test_s']:.0f} s; "
        f"{e['command_s_without_synthesis']} s with preparation")
EOF
# The exit status: 1 if a stage failed or ran out of time (a skipped epoch is no failure).
awk -F'\t' '$2 != "ok" && $2 != "skipped" { bad = 1 } END { exit bad }' "$WORK/stages.tsv"
