"""A synthetic BreakHis: the real tree, patients and file names, with H&E-like generated images.

BreakHis cannot be downloaded on the project's machines, so tests and the demo run on trees that
follow the real layout to the letter: the 82 patient ids of the release, their subtypes, the
archive's folders and file names, junk files that unpacked archives carry, a few odd-sized
images, and the folds in both files forms users have (a `Folds.csv` and an `mkfold` tree).

The images mimic H&E staining (Beer-Lambert mixing of a purple hematoxylin and a pink eosin
stain): fibrous pink stroma, white space, and purple nuclei. Malignant tissue has denser, larger,
more irregular and darker nuclei in sheets and clusters; benign tissue sparse, small, round nuclei
around gland-like rings, with more stroma and white space. Stain colour, intensity and nuclear
density vary per patient, and the class ranges touch at their edges, so a small CNN must learn the
texture, which it can at 48-64 px. Nuclei are larger at higher magnification. Generation is
deterministic for a seed (each image has its own random stream) and runs on a thread pool.

  jattn data synthesize --out /tmp/breakhis --images-per-patient 4
  jattn data synthesize --out /tmp/breakhis_full --counts real   # 7,909 images
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import shutil
import struct
import tempfile
import time
import zlib

import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFilter

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data.breakhis import folds as folds_lib
from jattn.data.breakhis import naming

# How much larger a nucleus looks at each magnification than at 40X.
MAG_SCALE = {"40X": 1.0, "100X": 1.5, "200X": 2.1, "400X": 2.8}
# Optical density per unit of stain in R, G, B (after Ruifrok & Johnston 2001, tuned to look like
# BreakHis): hematoxylin absorbs red and green (purple-blue), eosin mostly green (pink).
HEMATOXYLIN = np.array([0.56, 0.77, 0.31], np.float32)
EOSIN = np.array([0.16, 0.85, 0.50], np.float32)
# (dx, dy) of the few odd-sized images, like the handful of non-700x460 images of the release.
ODD_SIZE_DELTAS = ((0, -4), (-8, 0), (6, 4), (-2, -10), (12, -6))
# The demo's own data dir (configs/demo.py): a config with `synthetic.enabled` generates its tree
# there, or into a new or empty folder, never beside other files (`check_target`).
DEMO_DIR = "~/.cache/jattn/demo"


def _leftover(name: str) -> bool:
  """A file or folder that jattn itself leaves in a data dir whose preparation was interrupted."""
  return (name == ".lock" or name.startswith(".BreaKHis_v1.synthesizing-")
          or name.startswith(".BreaKHis_v1.unpacking-"))


def _only_leftovers(folder: str) -> bool:
  """True when `folder` (a prepared dir) holds nothing but locks and a killed run's temporaries."""
  for _, dirnames, names in os.walk(folder):
    if not all(n == ".lock" or n.startswith("incomplete.") or (n.startswith(".") and ".tmp-" in n)
               for n in names):
      return False
    dirnames[:] = [d for d in dirnames if not (d.startswith("incomplete.") or ".tmp-" in d)]
  return True


def check_target(data_dir: str, prepared_dir: str) -> None:
  """Refuses to generate a synthetic tree into `data_dir` unless it is the demo's own folder
  (`DEMO_DIR`), absent, or empty but for what an interrupted run of jattn left there, so that a
  mistyped `--config.data.dir` never fills a user's folder with fake BreakHis."""
  data_dir = os.path.abspath(data_dir)
  if os.path.realpath(data_dir) == os.path.realpath(os.path.expanduser(DEMO_DIR)):
    return
  if not os.path.isdir(data_dir):
    return
  prepared = os.path.relpath(os.path.abspath(prepared_dir), data_dir).split(os.sep)[0]
  foreign = sorted(
      name for name in os.listdir(data_dir)
      if not _leftover(name)
      and not (name == prepared and _only_leftovers(os.path.join(data_dir, name)))
  )
  if foreign:
    raise UserError(
        f"data_dir {data_dir} holds no BreaKHis_v1 but other files ({len(foreign)} entries, e.g. "
        f"{foreign[0]}): a synthetic data set is generated only into {DEMO_DIR} or a new or empty "
        f"folder, never beside other files; set --config.data.dir to such a folder, or to one "
        f"that holds BreaKHis_v1 (and --config.data.breakhis.synthetic.enabled=False for real data)"
    )


@dataclasses.dataclass(frozen=True)
class _Style:
  """How one patient's slides look: stain colours and the tissue's nuclear statistics."""

  hematoxylin: np.ndarray  # OD vector, [3]
  eosin: np.ndarray
  stain: float  # overall stain intensity
  coverage: float  # fraction of the tissue covered by nuclei at 40X
  radius: float  # nucleus radius at 40X, as a fraction of the image width
  irregularity: float  # relative jitter of a nucleus' outline
  darkness: float  # hematoxylin density inside a nucleus
  white: float  # fraction of white space
  glands: bool  # benign: nuclei ring gland-like structures; malignant: sheets and clusters


def _patient_style(rng: np.random.Generator, malignant: bool) -> _Style:
  def unit_jitter(v, sigma):
    v = v * np.exp(rng.normal(0.0, sigma, 3)).astype(np.float32)
    return v / np.linalg.norm(v)

  if malignant:
    shape = dict(
        coverage=rng.uniform(0.13, 0.26),
        radius=rng.uniform(0.0075, 0.0115),
        irregularity=rng.uniform(0.18, 0.38),
        darkness=rng.uniform(1.15, 1.70),
        white=rng.uniform(0.02, 0.20),
        glands=False,
    )
  else:
    shape = dict(
        coverage=rng.uniform(0.04, 0.12),
        radius=rng.uniform(0.0045, 0.0075),
        irregularity=rng.uniform(0.04, 0.16),
        darkness=rng.uniform(0.75, 1.20),
        white=rng.uniform(0.08, 0.35),
        glands=True,
    )
  return _Style(
      hematoxylin=unit_jitter(HEMATOXYLIN, 0.10),
      eosin=unit_jitter(EOSIN, 0.12),
      stain=rng.uniform(0.75, 1.25),
      **shape,
  )


def _smooth(
    rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]
) -> np.ndarray:
  """Smooth random field in [0, 1], [H, W]: a cells[0] x cells[1] grid upsampled bicubically."""
  grid = rng.random(cells, dtype=np.float32)
  field = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
  lo, hi = field.min(), field.max()
  return (field - lo) / max(hi - lo, 1e-6)


def _nucleus_centres(rng, style: _Style, n: int, r: float, width: int, height: int) -> np.ndarray:
  if style.glands:  # rings of nuclei around gland-like lumens, plus scattered stromal nuclei
    num_glands = max(1, n // 14)
    centres = rng.uniform((0, 0), (width, height), (num_glands, 2))
    ring = rng.uniform(3.0, 6.0, num_glands) * r
    g = rng.integers(0, num_glands, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    xy = centres[g] + (ring[g] * np.stack([np.cos(angle), np.sin(angle)])).T
    xy += rng.normal(0, 0.3 * r, (n, 2))
    scattered = rng.random(n) < 0.3
    xy[scattered] = rng.uniform((0, 0), (width, height), (int(scattered.sum()), 2))
  else:  # sheets: most nuclei crowd around cluster centres
    num_clusters = max(1, n // 40)
    centres = rng.uniform((0, 0), (width, height), (num_clusters, 2))
    spread = rng.uniform(4.0, 10.0, num_clusters) * r
    g = rng.integers(0, num_clusters, n)
    xy = centres[g] + rng.normal(0, 1, (n, 2)) * spread[g, None]
    uniform = rng.random(n) < 0.4
    xy[uniform] = rng.uniform((0, 0), (width, height), (int(uniform.sum()), 2))
  return xy


def render(
    rng: np.random.Generator, style: _Style, magnification: str, width: int, height: int
) -> np.ndarray:
  """One H&E-like image, uint8 [height, width, 3]."""
  scale = MAG_SCALE[magnification]
  # White space (lumens, fat) and fibrous stroma, as smooth fields.
  field = _smooth(rng, height, width, (3, 4))
  threshold = np.quantile(field[::4, ::4], 1.0 - style.white)
  white = np.clip((field - threshold) * 12.0, 0.0, 1.0)
  cells = (int(rng.integers(3, 7)), int(rng.integers(20, 40)))
  fibres = _smooth(rng, height, width, cells if rng.random() < 0.5 else cells[::-1])
  fibres = 0.6 * fibres + 0.4 * _smooth(rng, height, width, (24, 36))
  eosin = (0.30 + 0.55 * fibres) * (1.0 - white)

  # Nuclei: polygons with jittered outlines, drawn into a mask, then softened.
  r = style.radius * scale * width * rng.uniform(0.9, 1.1)
  n = int(style.coverage * rng.uniform(0.75, 1.25) * width * height / (np.pi * r * r))
  n = min(n, 4000)
  xy = _nucleus_centres(rng, style, n, r, width, height)
  inside = np.clip(xy.astype(int), 0, (width - 1, height - 1))
  keep = white[inside[:, 1], inside[:, 0]] < rng.random(n)  # few nuclei in white space
  xy = xy[keep]
  n = len(xy)
  m = 9  # vertices per nucleus
  angles = np.linspace(0, 2 * np.pi, m, endpoint=False) + rng.uniform(0, 2 * np.pi, (n, 1))
  radii = r * np.clip(1 + style.irregularity * rng.normal(0, 1, (n, m)), 0.4, 1.8)
  radii *= rng.uniform(0.8, 1.2, (n, 1))
  elongation = rng.uniform(1.0, 1.5, (n, 1))
  tilt = rng.uniform(0, np.pi, (n, 1))
  x = radii * np.cos(angles) * elongation
  y = radii * np.sin(angles) / elongation
  vertices = np.stack(
      [
          x * np.cos(tilt) - y * np.sin(tilt) + xy[:, :1],
          x * np.sin(tilt) + y * np.cos(tilt) + xy[:, 1:],
      ],
      axis=-1,
  ).reshape(n, 2 * m)
  fills = rng.integers(150, 256, n)
  mask = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(mask)
  for outline, fill in zip(vertices.tolist(), fills.tolist(), strict=True):
    draw.polygon(outline, fill=fill)
  mask = mask.filter(ImageFilter.GaussianBlur(max(0.4, 0.15 * r)))
  nuclei = np.asarray(mask, np.float32) * (1.0 / 255.0)
  nuclei *= 0.75 + 0.25 * rng.random((height, width), dtype=np.float32)  # chromatin

  hematoxylin = nuclei * style.darkness + 0.05 + 0.04 * fibres
  stains = np.stack([style.hematoxylin, style.eosin]) * np.float32(style.stain)  # [2, 3]
  density = np.stack([hematoxylin, eosin], axis=-1) @ stains  # optical density, [H, W, 3]
  rgb = np.exp(np.negative(density, out=density), out=density)
  rgb *= 255.0
  rgb += (rng.random((height, width, 1), dtype=np.float32) - 0.5) * 8.0  # sensor noise
  return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes, fast: the 'Sub' filter in numpy, then zlib at a low level.

  Three times faster than PIL's encoder (which tries every filter on every row); any PNG reader
  decodes it.
  """
  height, width, _ = image.shape
  rows = image.reshape(height, width * 3)
  filtered = np.empty((height, width * 3 + 1), np.uint8)
  filtered[:, 0] = 1  # filter type Sub: each byte minus the same channel of the pixel to its left
  filtered[:, 1:4] = rows[:, :3]
  np.subtract(rows[:, 3:], rows[:, :-3], out=filtered[:, 4:])

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
  return b"".join(
      [
          b"\x89PNG\r\n\x1a\n",
          chunk(b"IHDR", header),
          chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)),
          chunk(b"IEND", b""),
      ]
  )


def real_counts(seed: int = 0) -> dict[str, dict[str, int]]:
  """Images per patient and magnification whose totals per subtype x magnification are BreakHis'.

  Each subtype's counts (naming.COUNTS) are spread over its patients with per-patient weights
  (some patients have many more images, as in the release), at least one image each.
  """
  by_subtype = collections.defaultdict(list)
  for p in naming.patients():
    by_subtype[p.subtype].append(p.patient_id)
  counts: dict[str, dict[str, int]] = {}
  for s, subtype in enumerate(naming.SUBTYPE_CODES):
    ids = by_subtype[subtype]
    rng = np.random.default_rng([seed, 3, s])
    weights = rng.dirichlet(np.full(len(ids), 2.0))
    for patient_id in ids:
      counts[patient_id] = {}
    for mag, total in zip(naming.MAGNIFICATIONS, naming.COUNTS[subtype], strict=True):
      per_patient = 1 + rng.multinomial(total - len(ids), weights)
      for patient_id, c in zip(ids, per_patient, strict=True):
        counts[patient_id][mag] = int(c)
  return counts


def _junk(root: str, records: list[naming.Record], rng: np.random.Generator) -> list[str]:
  """Writes what unpacked archives carry besides images; returns their paths under root's parent."""
  written = []

  def put(rel: str, data: bytes):
    full = os.path.join(os.path.dirname(root), *rel.split("/"))
    with open(full, "wb") as f:
      f.write(data)
    written.append(rel)

  put(f"{naming.ROOT}/README.txt", b"BreakHis synthetic tree (jattn.data.synthetic)\n")
  put(f"{naming.ROOT}/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64))
  picks = rng.choice(len(records), size=min(3, len(records)), replace=False)
  for k, i in enumerate(sorted(picks.tolist())):
    folder, name = records[i].path.rsplit("/", 1)
    if k == 0:
      put(f"{folder}/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(120))
    elif k == 1:
      put(f"{folder}/._{name}", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(32))
    else:
      put(f"{folder.rsplit('/', 1)[0]}/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(32))
      put(f"{folder}/notes.txt", b"scanned 2014\n")
  return written


def _link_or_copy(source: str, target: str) -> None:
  try:
    os.link(source, target)
  except OSError:
    shutil.copyfile(source, target)


def _write_mkfold(out_dir: str, folds: folds_lib.Folds, records: list[naming.Record]) -> str:
  by_name = {r.file_name: r for r in records}
  target = os.path.join(out_dir, "mkfold")
  files.remove(target)
  with files.atomic_folder(target) as tmp:
    for fold, split in folds.splits.items():
      for group in folds_lib.GROUPS:
        for mag in naming.MAGNIFICATIONS:
          os.makedirs(os.path.join(tmp, f"fold{fold}", group, mag))
      for name, group in split.items():
        r = by_name[name]
        _link_or_copy(
            os.path.join(out_dir, *r.path.split("/")),
            os.path.join(tmp, f"fold{fold}", group, r.magnification, name),
        )
  return target


def synthesize(
    out_dir: str,
    *,
    images_per_patient: int = 4,
    counts: str | None = None,
    width: int = 700,
    height: int = 460,
    seed: int = 0,
    junk: bool = True,
    odd_sizes: int = 3,
    folds_csv: bool = True,
    mkfold: bool = True,
    patients: tuple[str, ...] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict:
  """Writes `<out_dir>/BreaKHis_v1` (and `Folds.csv`, `mkfold/`) and returns a summary dict.

  `images_per_patient` images per patient and magnification, or `counts='real'` for BreakHis'
  7,909 (see `real_counts`); `width` x `height` PNGs, `odd_sizes` of them a few pixels off;
  `patients` a subset of the 82 ids (default all). The folds written are `generate_folds(seed)`.
  The tree appears whole or not at all; an existing BreaKHis_v1 is never touched.
  """
  start = time.time()
  out_dir = os.path.abspath(out_dir)
  root = os.path.join(out_dir, naming.ROOT)
  if os.path.exists(root):
    raise UserError(f"{root} already exists: remove it or choose another output folder")
  if counts not in (None, "real"):
    raise UserError(f"counts must be 'real' or left out, got {counts!r}")
  if counts is None and images_per_patient < 1:
    raise UserError(f"images_per_patient must be at least 1, got {images_per_patient}")
  if width < 16 or height < 16:
    raise UserError(f"synthetic images must be at least 16x16 pixels, got {width}x{height}")
  chosen = [p for p in naming.patients() if patients is None or p.patient_id in patients]
  if patients is not None and len(chosen) != len(set(patients)):
    unknown = sorted(set(patients) - {p.patient_id for p in chosen})
    raise UserError(f"unknown patient id(s) {', '.join(unknown)}: see "
                    f"jattn/data/breakhis/patients.tsv")
  per_patient = real_counts(seed) if counts == "real" else None

  plan = []  # (patient index, patient, magnification, sequence)
  for index, patient in enumerate(naming.patients()):
    if patient not in chosen:
      continue
    for mag in naming.MAGNIFICATIONS:
      k = per_patient[patient.patient_id][mag] if per_patient else images_per_patient
      plan.extend((index, patient, mag, seq) for seq in range(1, k + 1))
  records = [naming.record(naming.image_path(p.patient_id, m, s)) for _, p, m, s in plan]
  styles = {
      index: _patient_style(np.random.default_rng([seed, 1, index]), patient.label == 1)
      for index, patient, _, _ in plan
  }
  layout_rng = np.random.default_rng([seed, 4])
  odd = layout_rng.choice(len(plan), size=min(odd_sizes, len(plan)), replace=False).tolist()
  sizes = [(width, height)] * len(plan)
  for k, i in enumerate(odd):
    dx, dy = ODD_SIZE_DELTAS[k % len(ODD_SIZE_DELTAS)]
    sizes[i] = (width + dx * (1 + k // len(ODD_SIZE_DELTAS)), height + dy)

  os.makedirs(out_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".BreaKHis_v1.synthesizing-", dir=out_dir)
  try:
    tmp_root = os.path.join(tmp, naming.ROOT)
    for folder in sorted({r.path.rsplit("/", 1)[0] for r in records}):
      os.makedirs(os.path.join(tmp, *folder.split("/")))

    def write(i: int) -> None:
      index, _, mag, seq = plan[i]
      rng = np.random.default_rng([seed, 2, index, naming.MAGNIFICATIONS.index(mag), seq])
      image = render(rng, styles[index], mag, *sizes[i])
      with open(os.path.join(tmp, *records[i].path.split("/")), "wb") as f:
        f.write(encode_png(image))

    workers = threads or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = pool.map(write, range(len(plan)), chunksize=8)
      if progress:
        done = tqdm.tqdm(done, total=len(plan), desc="Synthesizing BreakHis", unit="img")
      for _ in done:
        pass
    junk_files = _junk(tmp_root, records, layout_rng) if junk else []
    os.replace(tmp_root, root)
  finally:
    files.remove(tmp)

  folds = folds_lib.generate_folds(records, seed)
  folds_path = os.path.join(out_dir, "Folds.csv") if folds_csv else None
  if folds_path:
    folds_lib.write_folds_csv(folds, records, folds_path)
  mkfold_path = _write_mkfold(out_dir, folds, records) if mkfold else None
  by_subtype = {s: dict.fromkeys(naming.MAGNIFICATIONS, 0) for s in naming.SUBTYPE_CODES}
  for r in records:
    by_subtype[r.subtype][r.magnification] += 1
  return {
      "out_dir": out_dir,
      "images": len(records),
      "patients": len(chosen),
      "by_subtype": by_subtype,
      "size": [width, height],
      "odd_sized": [records[i].path for i in sorted(odd)],
      "junk": junk_files,
      "folds_csv": folds_path,
      "mkfold": mkfold_path,
      "seed": seed,
      "seconds": round(time.time() - start, 2),
  }


def sample_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """`n` synthetic H&E-like images, uint8 [n, size, size, 3], alternately benign and malignant."""
  rngs = [np.random.default_rng([seed, 2, i]) for i in range(n)]
  return np.stack([render(rng, _patient_style(rng, i % 2 == 1), "100X", size, size)
                   for i, rng in enumerate(rngs)])
