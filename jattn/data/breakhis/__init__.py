"""BreakHis (Spanhol et al., IEEE TBME 2016), the data set of the paper, as a jattn data source.

naming.py (classes, subtypes, magnifications, file names, patients), scan.py (the tree), fetch.py
(download), folds.py (the three fold forms), tfds_builder.py (`Breakhis` and its preparation),
synthetic.py (a synthetic tree for tests and the demo), describe.py (`jattn data
describe`), source.py (the source: `load_fold` -> FoldData), published.py (the paper's figures).
The naming facts are re-exported here; the rest is imported where it is used.
"""

from jattn.data.breakhis.naming import *  # noqa: F403
from jattn.data.breakhis.naming import __all__ as _naming_all

__all__ = list(_naming_all)
