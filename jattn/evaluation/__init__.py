"""Figures of a run and of a sweep: metrics, the evaluator, results.json, tables and paired
comparisons."""
