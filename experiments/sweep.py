"""Runs configs x folds, one work dir each, then prints the paper's Tables 1 and 2 from them.

  python experiments/sweep.py                        # the paper's four rows, folds 1-5
  python experiments/sweep.py --set num_epochs=130 --set data_dir=/data/breakhis
  python experiments/sweep.py --demo                 # the four rows on the demo data, folds 1-2

Each run is `python -m jattn.main --config SPEC --workdir OUT/<name>/fold<k> --config.fold=k`
plus the `--set` overrides, its output appended to its work dir's log.txt. A finished run
(results.json present) is not repeated and an interrupted one resumes from its last checkpoint,
so the same command can be run again after any interruption. With several GPUs
(CUDA_VISIBLE_DEVICES, or all that nvidia-smi lists) one run goes to each GPU at a time;
otherwise runs go one after another. The tables come from `python -m jattn.tables OUT`, which
can also be run on its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: find jattn and configs

from jattn import config_lib, files, tables  # noqa: E402
from jattn.errors import UserError, exit_on_user_error  # noqa: E402

PAPER_ROWS = ["configs/vgg19.py", "configs/vgg19_c.py", "configs/vgg19_s.py", "configs/ours.py"]
DEMO_ROWS = ["configs/demo.py:vgg19", "configs/demo.py:vgg19_c", "configs/demo.py:vgg19_s",
             "configs/demo.py:ours"]


def plan(configs: list[str], folds: list[int], overrides: list[str]) -> list[dict]:
  """One entry per run: its config, fold, name and work dir (configs are loaded to check them)."""
  runs = []
  for spec in configs:
    config = config_lib.apply_overrides(config_lib.load_config(_repo_path(spec)), overrides)
    for fold in folds:
      runs.append({"config": spec, "name": config.name, "fold": fold,
                   "workdir": os.path.join(config.name, f"fold{fold}")})
  names = [r["name"] for r in runs]
  if len(set(zip(names, [r["fold"] for r in runs], strict=True))) != len(runs):
    raise UserError("two configs in the sweep share a name; give each its own config.name")
  return runs


def _repo_path(spec: str) -> str:
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return path + sep + arg


def write_manifest(out: str, runs: list[dict], folds: list[int], overrides: list[str]) -> None:
  names = list(dict.fromkeys(r["name"] for r in runs))
  manifest = {"names": names, "folds": folds, "overrides": overrides, "runs": runs}
  files.atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(manifest, indent=2))


def is_finished(out: str, run: dict) -> bool:
  return os.path.exists(os.path.join(out, run["workdir"], "results.json"))


def gpu_slots() -> list[str | None]:
  """One slot per local GPU (a CUDA_VISIBLE_DEVICES value), or [None] to run one at a time."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [d for d in visible.split(",") if d.strip()]
    return ids if len(ids) > 1 else [None]
  if shutil.which("nvidia-smi"):
    try:
      listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
      ids = [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU")]
      return ids if len(ids) > 1 else [None]
    except (OSError, subprocess.SubprocessError):
      pass
  return [None]


def run_one(out: str, run: dict, overrides: list[str], gpu: str | None) -> int:
  """Runs (or resumes) one training run in a subprocess; returns its exit status."""
  workdir = os.path.join(out, run["workdir"])
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "jattn.main", "--config", _repo_path(run["config"]),
         "--workdir", workdir, f"--config.fold={run['fold']}"]
  cmd += [f"--config.{o}" for o in overrides]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  if gpu is not None:
    env["CUDA_VISIBLE_DEVICES"] = gpu
  with open(os.path.join(workdir, "log.txt"), "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


def _last_line(path: str) -> str:
  try:
    with open(path) as f:
      lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""
  except OSError:
    return ""


def sweep(configs: list[str], folds: list[int], out: str, overrides: list[str]) -> str:
  """Runs every unfinished run, then writes and returns the tables."""
  out = os.path.abspath(out)
  runs = plan(configs, folds, overrides)
  write_manifest(out, runs, folds, overrides)
  todo = [r for r in runs if not is_finished(out, r)]
  print(f"sweep {out}: {len(runs)} runs, {len(runs) - len(todo)} finished before, "
        f"{len(todo)} to run", flush=True)
  slots = gpu_slots()
  free = list(slots)
  lock = threading.Lock()
  started, durations, failures = time.time(), [], []

  def work(run):
    with lock:
      gpu = free.pop()
      where = f" on GPU {gpu}" if gpu is not None else ""
      print(f"  start {run['name']} fold {run['fold']}{where}", flush=True)
    t0 = time.time()
    try:
      status = run_one(out, run, overrides, gpu)
    finally:
      with lock:
        free.append(gpu)
    with lock:
      durations.append(time.time() - t0)
      done = len(durations)
      left = (len(todo) - done) * (sum(durations) / done) / len(slots)
      state = "done" if status == 0 else f"FAILED (exit {status})"
      print(f"[{len(runs) - len(todo) + done}/{len(runs)}] {run['name']} fold {run['fold']} "
            f"{state} in {durations[-1] / 60:.1f} min; about {left / 60:.0f} min left", flush=True)
      if status:
        failures.append((run, status))
    return status

  with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
    futures = []
    for run in todo:
      futures.append(pool.submit(work, run))
    for future in futures:
      if future.result() != 0 and len(slots) == 1:
        for f in futures:
          f.cancel()  # a failure (often bad input, the same for every run) stops the sweep
        break
  if failures:
    run, status = failures[0]
    log = os.path.join(out, run["workdir"], "log.txt")
    raise UserError(f"{run['name']} fold {run['fold']} failed (exit {status}): "
                    f"{_last_line(log)} (full log: {log}); fix it and run the sweep again, "
                    f"finished runs are kept")
  text = tables.write_tables(out)  # checks every results.json before saying all is well
  print(f"all {len(runs)} runs finished in {(time.time() - started) / 60:.1f} min", flush=True)
  return text


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python experiments/sweep.py",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--configs", help="comma-separated config specs (default: the paper's rows)")
  parser.add_argument("--folds", default=None, help="comma-separated folds (default 1,2,3,4,5)")
  parser.add_argument("--out", default=None,
                      help="sweep folder (default sweeps/paper or sweeps/demo)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override passed to every run (repeatable)")
  parser.add_argument("--demo", action="store_true",
                      help="the four rows on the built-in demo data, folds 1 and 2")
  args = parser.parse_args(argv)
  with exit_on_user_error("sweep"):
    configs = args.configs.split(",") if args.configs else (DEMO_ROWS if args.demo else PAPER_ROWS)
    default_folds = "1,2" if args.demo else "1,2,3,4,5"
    try:
      folds = [int(f) for f in (args.folds or default_folds).split(",")]
    except ValueError:
      raise UserError(f"--folds {args.folds!r}: give fold numbers like 1,2,3") from None
    if not set(folds) <= {1, 2, 3, 4, 5}:
      raise UserError(f"--folds {args.folds}: folds are numbered 1 to 5")
    out = args.out or os.path.join(REPO, "sweeps", "demo" if args.demo else "paper")
    print(sweep(configs, folds, out, args.set))


if __name__ == "__main__":
  main()
