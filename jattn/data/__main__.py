"""Command line of jattn.data: fetch BreakHis, generate a synthetic tree, describe a tree and its
folds, or preview the augmentation.

  python -m jattn.data download [--data-dir data] [--url URL] [--keep-archive] [--no-image-check]
      [--forget-checksum]
  python -m jattn.data synthesize --out DIR [--images-per-patient 4 | --counts real]
      [--width 700 --height 460] [--seed 0] [--no-junk] [--odd-sizes 3] [--no-folds]
  python -m jattn.data describe --source DATA_DIR [--folds FOLDS_CSV_OR_MKFOLD] [--seed 0]
      [--json] [--no-image-check] [--threads 2]
  python -m jattn.data augment-preview --out GRID.png [--config configs/ours_stain.py]
      [--rows 4] [--samples 7] [--seed 0] [IMAGE...]

`download` fetches BreaKHis_v1.tar.gz (resumable; jattn.data.fetch), checks and unpacks it into
DATA_DIR, records its SHA-256 in DATA_DIR/downloads.json (a later download must match it;
--forget-checksum drops the record first), deletes the archive (unless --keep-archive) and then
describes the data set as `describe` does. A DATA_DIR that holds BreaKHis_v1 is not touched.

`describe` reads DATA_DIR (the folder that holds BreaKHis_v1; it writes nothing) and prints, per
fold, split and magnification, image and patient counts by class, then every problem it found.
Without --folds (or with `--folds generated`) it describes the folds `config.folds='generated'`
would use for `--seed`.
With --json it prints one JSON object with these keys:

  source        absolute path of DATA_DIR
  images        images in the data set (well named and readable)
  patients      patients in the data set
  classes       {benign|malignant: {images, patients}}
  subtypes      {A|F|PT|TA|DC|LC|MC|PC: {40X, 100X, 200X, 400X, total (images), patients}}
  magnifications  {40X|100X|200X|400X: {benign, malignant, total}} (images)
  ignored       paths of junk files skipped by the scan (Thumbs.db, .DS_Store, ._*, text, ...)
  unreadable    paths of PNGs that do not decode
  folds_source  the Folds.csv or mkfold folder read, or 'generated (seed N)'
  folds         {"1".."5": {train|test: {40X|100X|200X|400X|all: {images: {benign, malignant,
                total}, patients: {benign, malignant, total}}}, leaked_patients: [ids],
                left_out: images of the data set in neither split}}
  problems      one line each: unparseable names, unreadable images, duplicate names, folder/name
                disagreement, missing folds (of 1..5), leaks, listed files not in the data set,
                folds without training or test images or without training images of a class
  warnings      one line each: what does not make a fold unusable: magnifications without test
                (or training) images in a fold (absent from its results), files a fold drops
                or leaves out
  release       how the copy compares with the full BreakHis release: {images, of_images (7,909),
                patients (of the release's), of_patients (82), missing_patients: [ids of the
                release's not found], other_patients: [ids found that are not the release's],
                differing: {subtype: {magnification: [images found, images released]}} for the
                cells that differ, complete: true when none is missing, other or differing}

Errors are one line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jattn.data import breakhis
from jattn.data import folds as folds_lib
from jattn.data import scan as scan_lib
from jattn.errors import UserError, exit_on_user_error

PROG = "python -m jattn.data"


def _tally(records) -> dict:
  """{images, patients} x {benign, malignant, total} of `records`."""
  out = {"images": {}, "patients": {}}
  for label, name in enumerate(breakhis.CLASSES):
    chosen = [r for r in records if r.label == label]
    out["images"][name] = len(chosen)
    out["patients"][name] = len({r.patient_id for r in chosen})
  out["images"]["total"] = len(records)
  out["patients"]["total"] = len({r.patient_id for r in records})
  return out


def _split_counts(records) -> dict:
  counts = {
      m: _tally([r for r in records if r.magnification == m]) for m in breakhis.MAGNIFICATIONS
  }
  counts["all"] = _tally(records)
  return counts


def describe(
    source: str,
    *,
    folds: str | None = None,
    seed: int = 0,
    check_images: bool = True,
    threads: int = 2,
) -> dict:
  """The counts and problems of the tree in `source` and of its folds (see the module docstring)."""
  source = scan_lib.resolve_data_dir(os.path.abspath(source))
  found = scan_lib.scan(source)
  unreadable = (
      scan_lib.unreadable_images(source, found.records, threads=threads) if check_images else {}
  )
  records = [r for r in found.records if r.path not in unreadable]
  problems = list(found.problems)
  problems += [f"unreadable image: {path}: {why}" for path, why in sorted(unreadable.items())]
  if folds in (None, "generated"):
    chosen = folds_lib.generate_folds(records, seed)
  else:
    path = folds if os.path.exists(folds) else os.path.join(source, folds)
    if not os.path.exists(path):
      raise UserError(f"--folds {folds}: no such Folds.csv file or mkfold folder")
    chosen = folds_lib.read_folds(path)
  fold_problems, warnings = folds_lib.check_folds(chosen, records, skipped=unreadable)
  problems += fold_problems
  by_name = {r.file_name: r for r in records}
  folds_out = {}
  for fold, split in chosen.splits.items():
    sides = {
        g: [by_name[n] for n, grp in split.items() if grp == g and n in by_name]
        for g in folds_lib.GROUPS
    }
    folds_out[str(fold)] = {
        **{g: _split_counts(sides[g]) for g in folds_lib.GROUPS},
        "leaked_patients": sorted(
            {r.patient_id for r in sides["train"]} & {r.patient_id for r in sides["test"]}
        ),
        "left_out": sum(1 for n in by_name if n not in split),
    }
  subtypes = {}
  for code in breakhis.SUBTYPE_CODES:
    chosen_records = [r for r in records if r.subtype == code]
    row = {m: sum(r.magnification == m for r in chosen_records) for m in breakhis.MAGNIFICATIONS}
    row["total"] = len(chosen_records)
    row["patients"] = len({r.patient_id for r in chosen_records})
    subtypes[code] = row
  overall = _tally(records)
  release_ids = [p.patient_id for p in breakhis.patients()]
  found_ids = {r.patient_id for r in records}
  differing = {}
  for code, released in breakhis.COUNTS.items():
    cells = {m: [subtypes[code][m], n] for m, n in zip(breakhis.MAGNIFICATIONS, released,
                                                        strict=True) if subtypes[code][m] != n}
    if cells:
      differing[code] = cells
  release = {
      "images": len(records),
      "of_images": breakhis.NUM_IMAGES,
      "patients": len(found_ids.intersection(release_ids)),
      "of_patients": len(release_ids),
      "missing_patients": [p for p in release_ids if p not in found_ids],
      "other_patients": sorted(found_ids.difference(release_ids)),
      "differing": differing,
  }
  release["complete"] = not (release["missing_patients"] or release["other_patients"] or differing)
  return {
      "source": source,
      "images": len(records),
      "patients": overall["patients"]["total"],
      "classes": {
          c: {"images": overall["images"][c], "patients": overall["patients"][c]}
          for c in breakhis.CLASSES
      },
      "subtypes": subtypes,
      "magnifications": {
          m: {
              **{
                  c: sum(r.magnification == m and r.label == i for r in records)
                  for i, c in enumerate(breakhis.CLASSES)
              },
              "total": sum(r.magnification == m for r in records),
          }
          for m in breakhis.MAGNIFICATIONS
      },
      "ignored": list(found.ignored),
      "unreadable": sorted(unreadable),
      "folds_source": chosen.source,
      "folds": folds_out,
      "problems": problems,
      "warnings": warnings,
      "release": release,
  }


def _some(items, shown: int = 3) -> str:
  items = list(items)
  more = f" and {len(items) - shown} more" if len(items) > shown else ""
  return ", ".join(items[:shown]) + more


def format_release(r: dict) -> str:
  """One line: how `describe`'s copy compares with the full BreakHis release."""
  if r["complete"]:
    return (f"the full BreakHis release: all {r['of_images']:,} images of its {r['of_patients']} "
            f"patients")
  line = (f"not the full BreakHis release: {r['images']:,} of {r['of_images']:,} images, "
          f"{r['patients']} of {r['of_patients']} patients")
  if r["missing_patients"]:
    line += f" ({len(r['missing_patients'])} missing: {_some(r['missing_patients'])})"
  if r["other_patients"]:
    line += f"; {len(r['other_patients'])} not in the release: {_some(r['other_patients'])}"
  cells = [f"{code} {m}: {found} of {n}" for code, row in r["differing"].items()
           for m, (found, n) in row.items()]
  if cells and not r["missing_patients"]:  # with patients missing, the counts differ of course
    line += f"; images per subtype and magnification differ: {_some(cells)}"
  return line


def format_description(d: dict) -> str:
  """The human-readable form of `describe`'s result."""
  mags = breakhis.MAGNIFICATIONS
  lines = [f"BreakHis at {d['source']}: {d['images']} images of {d['patients']} patients",
           format_release(d["release"])]
  columns = "".join(f"{m:>7s}" for m in mags)
  lines.append(f"  {'':24s}{columns}{'total':>8s}{'patients':>10s}")
  for c in breakhis.CLASSES:
    cells = "".join(f"{d['magnifications'][m][c]:7d}" for m in mags)
    totals = f"{d['classes'][c]['images']:8d}{d['classes'][c]['patients']:10d}"
    lines.append(f"  {c:24s}{cells}{totals}")
  for code, row in d["subtypes"].items():
    label = f"{code:3s}{breakhis.SUBTYPES[code][0]}"
    cells = "".join(f"{row[m]:7d}" for m in mags)
    lines.append(f"    {label:22s}{cells}{row['total']:8d}{row['patients']:10d}")
  lines.append(
      f"ignored {len(d['ignored'])} junk file(s); {len(d['unreadable'])} unreadable image(s)"
  )
  lines.append(f"folds: {d['folds_source']}  (images/patients)")
  header = "".join(f"{c:>13s}   " for c in (*breakhis.CLASSES, "total"))
  lines.append(f"  {'fold':6s}{'split':7s}{'mag':6s}{header}")
  for fold, entry in d["folds"].items():
    for group in folds_lib.GROUPS:
      for mag in (*mags, "all"):
        c = entry[group][mag]
        cells = "".join(
            f"{c['images'][k]:>10d}/{c['patients'][k]:<5d}" for k in (*breakhis.CLASSES, "total")
        )
        lines.append(f"  {fold:6s}{group:7s}{mag:6s}{cells}".rstrip())
  lines.append(f"problems ({len(d['problems'])}):")
  lines += [f"  - {p}" for p in d["problems"]] or ["  none"]
  if d["warnings"]:
    lines.append(f"warnings ({len(d['warnings'])}):")
    lines += [f"  - {w}" for w in d["warnings"]]
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  dl = commands.add_parser("download", help="download and unpack BreakHis, then describe it")
  dl.add_argument("--data-dir", default="data", help="the folder to hold BreaKHis_v1")
  dl.add_argument("--url", help="where to download from (default: $JATTN_BREAKHIS_URL or the "
                  "official archive)")
  dl.add_argument("--keep-archive", action="store_true", help="keep BreaKHis_v1.tar.gz")
  dl.add_argument("--no-image-check", action="store_true", help="do not decode every image")
  dl.add_argument("--forget-checksum", action="store_true",
                  help="forget the SHA-256 recorded in DATA_DIR/downloads.json by an earlier "
                  "download (when the archive served now is the right one)")
  preview = commands.add_parser("augment-preview", help="a PNG grid of augmented samples")
  preview.add_argument("--out", required=True, help="the PNG file to write")
  preview.add_argument("--config", default="configs/ours_stain.py",
                       help="the config whose `augment` fields are shown")
  preview.add_argument("--rows", type=int, default=4, help="synthetic images (without IMAGE)")
  preview.add_argument("--samples", type=int, default=7, help="augmented draws per image")
  preview.add_argument("--seed", type=int, default=0)
  preview.add_argument("images", nargs="*", help="image files (default: synthetic H&E-like)")
  syn = commands.add_parser("synthesize", help="write a synthetic BreaKHis_v1 tree")
  syn.add_argument(
      "--out", required=True, help="folder to hold BreaKHis_v1 (and Folds.csv, mkfold/)"
  )
  syn.add_argument("--images-per-patient", type=int, default=4, help="per magnification")
  syn.add_argument("--counts", choices=["real"], help="'real': BreakHis' 7,909 images")
  syn.add_argument("--width", type=int, default=700)
  syn.add_argument("--height", type=int, default=460)
  syn.add_argument("--seed", type=int, default=0)
  syn.add_argument("--no-junk", action="store_true", help="no Thumbs.db, .DS_Store, ._*, .txt")
  syn.add_argument("--odd-sizes", type=int, default=3, help="images a few pixels off the size")
  syn.add_argument("--no-folds", action="store_true", help="no Folds.csv and mkfold/")
  syn.add_argument("--threads", type=int, default=None)
  desc = commands.add_parser("describe", help="counts and problems of a tree and its folds")
  desc.add_argument("--source", required=True, help="the folder that holds BreaKHis_v1")
  desc.add_argument("--folds", help="'generated' (the default), a Folds.csv or an mkfold folder")
  desc.add_argument("--seed", type=int, default=0, help="seed of the generated folds")
  desc.add_argument("--json", action="store_true", help="print one JSON object")
  desc.add_argument("--no-image-check", action="store_true", help="do not decode every image")
  desc.add_argument("--threads", type=int, default=2)
  return parser


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  with exit_on_user_error(PROG):
    if args.command == "download":
      from jattn.data import fetch

      did = fetch.ensure_breakhis(args.data_dir, url=args.url, keep_archive=args.keep_archive,
                                  forget_checksum=args.forget_checksum)
      if did == "present":
        print(f"{os.path.abspath(args.data_dir)} already holds {breakhis.ROOT}: nothing "
              f"downloaded", flush=True)
      print(format_description(describe(args.data_dir, check_images=not args.no_image_check)))
    elif args.command == "augment-preview":
      from jattn import config_lib
      from jattn.data import preview

      config = config_lib.load_config(args.config)
      rows, columns = preview.write_preview(config, args.out, args.images, rows=args.rows,
                                            samples=args.samples, seed=args.seed)
      print(f"wrote {args.out}: {rows} image(s), each as given and in {columns - 1} draws of "
            f"{args.config}'s augmentation {config.augment.to_dict()}")
    elif args.command == "synthesize":
      from jattn.data import synthetic

      summary = synthetic.synthesize(
          args.out,
          images_per_patient=args.images_per_patient,
          counts=args.counts,
          width=args.width,
          height=args.height,
          seed=args.seed,
          junk=not args.no_junk,
          odd_sizes=args.odd_sizes,
          folds_csv=not args.no_folds,
          mkfold=not args.no_folds,
          threads=args.threads,
          progress=True,
      )
      print(json.dumps(summary, indent=1))
    else:
      d = describe(
          args.source,
          folds=args.folds,
          seed=args.seed,
          check_images=not args.no_image_check,
          threads=args.threads,
      )
      print(json.dumps(d) if args.json else format_description(d))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
