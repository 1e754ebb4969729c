"""Start recipes where they run, and look after SLURM jobs.

    python -m launch local recipes/coconut.py --nproc 2 [--deepspeed zero1|zero2|zero3] [--config FILE] [--dry-run] [key=value ...]
    python -m launch slurm recipes/coconut.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        [--account A --qos Q --constraint C --mem 200G --cpus-per-task 8] [--profile slurm/profiles/X.yaml] \\
        [--sweep optim.lr=1e-4,3e-4] [--config FILE] [--dry-run] [--wait] [key=value ...]
    python -m launch status|tail|cancel JOBID
    srun python -m launch task recipes/coconut.py run.run_dir=DIR [key=value ...]   # inside an allocation (slurm/train.sbatch)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import local  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="where", required=True)
    lo = sub.add_parser("local", help="N processes on this machine (CUDA GPUs, else CPU ranks with gloo)")
    lo.add_argument("script")
    lo.add_argument("--nproc", type=int, default=1)
    lo.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    lo.add_argument("--deepspeed", choices=("zero1", "zero2", "zero3"), default="",
                    help="DeepSpeed ZeRO stage (sets run.deepspeed; started with torchrun)")
    lo.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    lo.add_argument("--config", metavar="FILE", help="the recipe's --config FILE (.json/.yaml: e.g. a run's config.json)")

    sl = sub.add_parser("slurm", help="submit to SLURM through submitit (one task per GPU, or CPU tasks)")
    sl.add_argument("script")
    sl.add_argument("--nodes", type=int)
    sl.add_argument("--gpus-per-node", type=int)
    sl.add_argument("--tasks-per-node", type=int, help="default: one per GPU, else 1 (CPU ranks use gloo)")
    sl.add_argument("--cpus-per-task", type=int)
    sl.add_argument("--mem", help="per node, as sbatch takes it (e.g. 200G)")
    sl.add_argument("--partition")
    sl.add_argument("--time", help="wall-clock limit, HH:MM:SS (default 01:00:00)")
    sl.add_argument("--account")
    sl.add_argument("--qos")
    sl.add_argument("--constraint")
    sl.add_argument("--name", help="job name (default attrdist-<recipe>)")
    sl.add_argument("--logs", help="submitit's folder root (default runs/slurm; one folder per job id)")
    sl.add_argument("--max-requeues", type=int, help="how often a preempted / timed-out job is requeued (default 3)")
    sl.add_argument("--signal-delay-s", type=int,
                    help="SLURM signals USR2 this long before the time limit (default 90): time to checkpoint")
    sl.add_argument("--array-parallelism", type=int, help="sweeps: at most this many array jobs at once")
    sl.add_argument("--deepspeed", choices=("zero1", "zero2", "zero3"), default="",
                    help="DeepSpeed ZeRO stage (sets run.deepspeed)")
    sl.add_argument("--profile", help="cluster defaults: a YAML file, or a name in slurm/profiles/ "
                                      "(--profile full|demo is passed on to the recipe)")
    sl.add_argument("--config", metavar="FILE", help="the recipe's --config FILE (.json/.yaml: e.g. a run's "
                                                   "config.json); copied into each job's run directory at submission")
    sl.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                    help="one job per combination (a job array); repeatable. Values in brackets are one value each, "
                         "as hydra writes them: --sweep 'data.augment.crop_scale=[0.5,1.0],[0.7,1.0]' is 2 jobs "
                         "(quote them: the shell globs brackets)")
    sl.add_argument("--dry-run", action="store_true", help="print the resolved submission and sbatch script")
    sl.add_argument("--wait", action="store_true", help="wait for the job(s) and print the outcome")

    tk = sub.add_parser("task", help="one SLURM task of a recipe (under srun in an allocation: slurm/train.sbatch)")
    tk.add_argument("script")
    tk.add_argument("--max-requeues", type=int, default=3)

    for cmd, text in (("status", "state, attempts, restarts, result or error, log paths"),
                      ("tail", "print (or follow with -f) a task's log"), ("cancel", "scancel the job")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("job_id")
        if cmd == "status":
            p.add_argument("--wait", action="store_true", help="until the job ends")
        if cmd == "tail":
            p.add_argument("-f", "--follow", action="store_true")
            p.add_argument("-n", "--lines", type=int, default=40)
            p.add_argument("--task", type=int, default=0, help="which task's log (default 0)")

    # everything after the script that is not a launcher option goes to the recipe (key=value, --resume, ...)
    args, recipe_args = ap.parse_known_args(argv)
    if getattr(args, "profile", None) in ("full", "demo"):  # the recipe's --profile, not a cluster profile
        recipe_args, args.profile = ["--profile", args.profile, *recipe_args], None
    if getattr(args, "config", None):  # absolute: a SLURM job may start in another directory
        recipe_args = ["--config", str(Path(args.config).resolve()), *recipe_args]
    if args.where == "local":
        return local.run(args.script, args.nproc, recipe_args, dry_run=args.dry_run, device=args.device,
                         deepspeed=args.deepspeed)
    if recipe_args and args.where != "slurm" and args.where != "task":
        ap.error(f"unrecognized arguments: {' '.join(recipe_args)}")
    from launch import slurm

    if args.where == "slurm":
        flags = {k: getattr(args, k) for k in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem",
                                               "partition", "time", "account", "qos", "constraint", "name", "logs",
                                               "max_requeues", "signal_delay_s", "array_parallelism")}
        if args.deepspeed:
            recipe_args = [*recipe_args, f"run.deepspeed={args.deepspeed}"]
        return slurm.submit(args.script, recipe_args, flags, profile=args.profile, sweeps=args.sweep,
                            dry_run=args.dry_run, wait=args.wait)
    if args.where == "task":
        return slurm.task(args.script, recipe_args, max_requeues=args.max_requeues)
    if args.where == "status":
        return slurm.status(args.job_id, wait=args.wait)
    if args.where == "tail":
        return slurm.tail(args.job_id, follow=args.follow, lines=args.lines, task=args.task)
    return slurm.cancel(args.job_id)


if __name__ == "__main__":
    sys.exit(main())
