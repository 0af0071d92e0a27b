"""Sweeps: configs x folds x seeds, one work dir each, run here or on SLURM."""
