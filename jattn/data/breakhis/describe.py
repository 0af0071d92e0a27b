"""`jattn data describe`: the counts and problems of a BreakHis tree and its folds.

`describe` reads DATA_DIR (the folder that holds BreaKHis_v1; it writes nothing) and prints, per
fold, split and magnification, image and patient counts by class, then every problem it found.
Without --folds (or with `--folds generated`) it describes the folds `config.data.folds='generated'`
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

import os

from jattn.core.errors import UserError
from jattn.data.breakhis import folds as folds_lib
from jattn.data.breakhis import naming
from jattn.data.breakhis import scan as scan_lib


def _tally(records) -> dict:
  """{images, patients} x {benign, malignant, total} of `records`."""
  out = {"images": {}, "patients": {}}
  for label, name in enumerate(naming.CLASSES):
    chosen = [r for r in records if r.label == label]
    out["images"][name] = len(chosen)
    out["patients"][name] = len({r.patient_id for r in chosen})
  out["images"]["total"] = len(records)
  out["patients"]["total"] = len({r.patient_id for r in records})
  return out


def _split_counts(records) -> dict:
  counts = {
      m: _tally([r for r in records if r.magnification == m]) for m in naming.MAGNIFICATIONS
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
  for code in naming.SUBTYPE_CODES:
    chosen_records = [r for r in records if r.subtype == code]
    row = {m: sum(r.magnification == m for r in chosen_records) for m in naming.MAGNIFICATIONS}
    row["total"] = len(chosen_records)
    row["patients"] = len({r.patient_id for r in chosen_records})
    subtypes[code] = row
  overall = _tally(records)
  release_ids = [p.patient_id for p in naming.patients()]
  found_ids = {r.patient_id for r in records}
  differing = {}
  for code, released in naming.COUNTS.items():
    cells = {m: [subtypes[code][m], n] for m, n in zip(naming.MAGNIFICATIONS, released,
                                                        strict=True) if subtypes[code][m] != n}
    if cells:
      differing[code] = cells
  release = {
      "images": len(records),
      "of_images": naming.NUM_IMAGES,
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
          for c in naming.CLASSES
      },
      "subtypes": subtypes,
      "magnifications": {
          m: {
              **{
                  c: sum(r.magnification == m and r.label == i for r in records)
                  for i, c in enumerate(naming.CLASSES)
              },
              "total": sum(r.magnification == m for r in records),
          }
          for m in naming.MAGNIFICATIONS
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
  mags = naming.MAGNIFICATIONS
  lines = [f"BreakHis at {d['source']}: {d['images']} images of {d['patients']} patients",
           format_release(d["release"])]
  columns = "".join(f"{m:>7s}" for m in mags)
  lines.append(f"  {'':24s}{columns}{'total':>8s}{'patients':>10s}")
  for c in naming.CLASSES:
    cells = "".join(f"{d['magnifications'][m][c]:7d}" for m in mags)
    totals = f"{d['classes'][c]['images']:8d}{d['classes'][c]['patients']:10d}"
    lines.append(f"  {c:24s}{cells}{totals}")
  for code, row in d["subtypes"].items():
    label = f"{code:3s}{naming.SUBTYPES[code][0]}"
    cells = "".join(f"{row[m]:7d}" for m in mags)
    lines.append(f"    {label:22s}{cells}{row['total']:8d}{row['patients']:10d}")
  lines.append(
      f"ignored {len(d['ignored'])} junk file(s); {len(d['unreadable'])} unreadable image(s)"
  )
  lines.append(f"folds: {d['folds_source']}  (images/patients)")
  header = "".join(f"{c:>13s}   " for c in (*naming.CLASSES, "total"))
  lines.append(f"  {'fold':6s}{'split':7s}{'mag':6s}{header}")
  for fold, entry in d["folds"].items():
    for group in folds_lib.GROUPS:
      for mag in (*mags, "all"):
        c = entry[group][mag]
        cells = "".join(
            f"{c['images'][k]:>10d}/{c['patients'][k]:<5d}" for k in (*naming.CLASSES, "total")
        )
        lines.append(f"  {fold:6s}{group:7s}{mag:6s}{cells}".rstrip())
  lines.append(f"problems ({len(d['problems'])}):")
  lines += [f"  - {p}" for p in d["problems"]] or ["  none"]
  if d["warnings"]:
    lines.append(f"warnings ({len(d['warnings'])}):")
    lines += [f"  - {w}" for w in d["warnings"]]
  return "\n".join(lines)
