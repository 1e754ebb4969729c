"""attrdist: train and evaluate visual attribute and classification models, laptop to SLURM.

The library is a functional core (config as frozen data, pure transforms keyed by explicit
RNG keys, pure losses and metrics) inside an imperative shell (accelerate, I/O, checkpoints).
"""

__version__ = "0.1.0"
