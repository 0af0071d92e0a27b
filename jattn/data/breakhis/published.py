"""Figures published on BreakHis that jattn's tables place beside a sweep's own.

Wu et al., ISBI 2019, Tables 1 and 2: image- and patient-level accuracy (%), mean ± std over 5
folds, per magnification, for the rows "VGG19", "VGG19 + C", "VGG19 + S" and "Ours". They are
comparable only with runs of the paper's setting (`jattn.tables` decides which).
"""

from __future__ import annotations

PAPER = "Wu et al., ISBI 2019"
# Table 1: image-level accuracy (%).
TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "VGG19": {"40X": (89.1, 3.4), "100X": (90.3, 3.9), "200X": (90.6, 2.8), "400X": (87.4, 2.4)},
    "VGG19 + C": {"40X": (91.1, 2.6), "100X": (91.5, 3.5), "200X": (92.0, 2.2),
                  "400X": (88.6, 2.3)},
    "VGG19 + S": {"40X": (89.9, 3.0), "100X": (91.7, 2.5), "200X": (92.2, 1.9),
                  "400X": (89.2, 2.5)},
    "Ours": {"40X": (91.4, 3.0), "100X": (92.2, 2.9), "200X": (93.4, 2.3), "400X": (90.0, 2.2)},
}
# Table 2: patient-level accuracy (%), majority vote, same rows.
TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "VGG19": {"40X": (95.7, 3.9), "100X": (96.4, 3.6), "200X": (96.4, 2.5), "400X": (92.9, 3.6)},
    "VGG19 + C": {"40X": (97.1, 3.0), "100X": (98.6, 2.0), "200X": (98.6, 2.0),
                  "400X": (95.7, 3.0)},
    "VGG19 + S": {"40X": (97.9, 3.2), "100X": (98.6, 2.0), "200X": (97.9, 3.2),
                  "400X": (94.3, 4.8)},
    "Ours": {"40X": (97.9, 3.2), "100X": (99.3, 1.6), "200X": (98.6, 2.0), "400X": (96.4, 2.5)},
}
# results.json key -> the published table holding it
FIGURES = {"image_accuracy": TABLE1, "group_accuracy": TABLE2}
