"""The imperative shell of a run: the trainer and everything with side effects around it.

  trainer      builds the run (runtime, run directory, task, data, model, optimizer) and drives the loop
  evaluation   the one ordered evaluation pass of every task, corrupt samples counted per shard
  rundir       the run directory: chosen by rank 0, locked while a run writes to it, train.log
  runtime      accelerate / DeepSpeed set-up, device and precision, accelerate launcher settings, process checks
  checkpoint   crash-safe checkpoints, resume, damaged ones set aside
  zero         DeepSpeed ZeRO glue; shm_allreduce: the CPU ranks' shared-memory all-reduce
  interrupt    SIGTERM/SIGUSR2 -> checkpoint at the end of the step
  tracking     metrics.jsonl, accelerate's trackers (run.log_with), curves.png; report: report.md / report.json
  progress     rate and ETA: plain log lines, or a tqdm bar on a terminal
  slurm_job    what runs inside a SLURM job (rendezvous from SLURM, requeue bookkeeping)
"""
