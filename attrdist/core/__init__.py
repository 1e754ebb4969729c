"""The functional core: pure functions and frozen data, no I/O, no collectives, no logging.

  config       the run's settings as frozen dataclasses; `key=value` overrides with one-line errors
  rng          keyed randomness: every random draw is a pure function of (seed, purpose, ...)
  order        which samples each rank reads in each step: a pure function of (seed, epoch)
  transforms   decode and augmentation, keyed per sample
  losses       the attribute BCE + contrastive loss
  metrics      multilabel AP/F1 and their trivial baselines; metrics_multiclass: accuracy & co.
  loop         the training loop's state, its pure transitions and `itstime` predicates
  schedules    the learning-rate factor of a step
  detection_eval   COCO mAP through pycocotools, base/novel classes, shuffled-label baseline

`tests/test_layout.py` checks that nothing here imports from the shell (attrdist.data, .pack,
.train, .demo, .models, ...).
"""
