"""Checkpoints that are complete or absent and load without running code, `resume=auto`
(`checkpoints`), every rank's random states (`rng`), and stopping cleanly on a signal or a SLURM
requeue (`interrupt`)."""
