"""How fast `train_batches` delivers images from a warm cache, and the memory it takes.

On a full-size data set (7,909 images, 700x460 PNG): if DATA_DIR holds no BreaKHis_v1, a synthetic
one with BreakHis' exact counts is generated there first (`--counts real`). Preparation (TFDS
records, the decoded cache at --image-size, folds and stats) runs in a child process, so that
the peak memory reported for loading (ru_maxrss of this process) is the loader's alone.

  python experiments/benchmark_loader.py --data-dir /tmp/breakhis_full      # ~10 min first time
  python experiments/benchmark_loader.py --data-dir /tmp/breakhis_full --batch-sizes 8,64

Prints one line per (batch size, threads): images/s over --epochs epochs after a warm-up epoch,
then the peak resident memory. Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from jattn.data import load_fold, steps_per_epoch, train_batches  # noqa: E402
from jattn.data.breakhis import scan as scan_lib  # noqa: E402


def _config(args):
  config = default.get_config()
  config.data.dir = args.data_dir
  config.data.prepared_dir = args.prepared_dir
  config.image_size = args.image_size
  config.loader_threads = 2
  config.fold = 1
  return config


def _peak_mib(who=resource.RUSAGE_SELF) -> float:
  return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _rss_now() -> str:
  """Resident memory now, split into private (anonymous) and file-backed (the memory map) pages."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  mib = {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}
  return f"{mib['RssAnon']:.0f} MiB private, {mib['RssFile']:.0f} MiB mapped from files"


def _prepare(args) -> None:
  """Child process: synthesize if needed, then load_fold once (prepares everything)."""
  if not scan_lib.has_images_tree(args.data_dir):
    from jattn.data.breakhis.synthetic import synthesize

    start = time.time()
    summary = synthesize(args.data_dir, counts="real", seed=0, progress=True)
    print(f"synthesized {summary['images']} images in {time.time() - start:.0f} s", flush=True)
  start = time.time()
  load_fold(_config(args))
  print(f"prepared (TFDS, cache at {args.image_size}, folds, stats) in {time.time() - start:.0f} s")
  print(f"peak memory of preparation: {_peak_mib():.0f} MiB", flush=True)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python experiments/benchmark_loader.py",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "breakhis_full"),
                      help="the data set (generated there at full size if it holds no "
                           "BreaKHis_v1; default: %(default)s)")
  parser.add_argument("--prepared-dir", default="",
                      help="where preparation goes (default: DATA_DIR/jattn_prepared)")
  parser.add_argument("--image-size", type=int, default=224,
                      help="side of the cached images (default 224)")
  parser.add_argument("--batch-sizes", default="8,32,64",
                      help="comma-separated batch sizes to time (default 8,32,64)")
  parser.add_argument("--threads", default="1,2",
                      help="comma-separated numbers of loader threads to time (default 1,2)")
  parser.add_argument("--epochs", type=int, default=2,
                      help="timed epochs per case, after one warm-up epoch (default 2)")
  parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
  return parser


def main() -> None:
  args = make_parser().parse_args()
  if args.prepare_only:
    _prepare(args)
    return

  subprocess.run([sys.executable, __file__, "--prepare-only", *sys.argv[1:]], check=True)
  start = time.time()
  fold_data = load_fold(_config(args))
  gib = fold_data.images.nbytes / 2**30
  print(
      f"load_fold on a prepared dir: {time.time() - start:.2f} s; {fold_data.num_images} images, "
      f"{len(fold_data.train_indices)} for training, cache {gib:.2f} GiB"
  )
  for batch_size in map(int, args.batch_sizes.split(",")):
    for threads in map(int, args.threads.split(",")):
      steps = steps_per_epoch(fold_data, batch_size)
      for _ in train_batches(fold_data, batch_size, seed=0, epoch=0, num_threads=threads):
        pass  # warm-up: pages of the memory map in the page cache
      start = time.time()
      for epoch in range(1, args.epochs + 1):
        for batch in train_batches(fold_data, batch_size, seed=0, epoch=epoch, num_threads=threads):
          assert batch["image"].shape[0] == batch_size
      seconds = time.time() - start
      images = args.epochs * steps * batch_size
      print(
          f"batch {batch_size:3d}, {threads} thread(s): {images / seconds:8.0f} images/s "
          f"({args.image_size}x{args.image_size}, {images} images in {seconds:.2f} s)"
      )
  print(f"peak memory of loading (ru_maxrss): {_peak_mib():.0f} MiB, of which now {_rss_now()}")
  print(f"cpu cores: {os.cpu_count()}")


if __name__ == "__main__":
  main()
