"""Training one fold: the train state, optimiser, step and loop, work dirs, checkpoints, the
parallel layout, config checks and old runs' compatibility."""
