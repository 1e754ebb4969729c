"""Process launching: `python -m launch local SCRIPT --nproc N [key=value ...]` (SLURM comes later)."""
