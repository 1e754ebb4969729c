"""Submit a recipe to SLURM through submitit, and look after the job without knowing submitit's layout.

    python -m launch slurm recipes/coconut.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        data.shards=/data/coconut-shards                       # 16 ranks (one per GPU), NCCL
    python -m launch slurm recipes/coconut.py --profile slurm/profiles/example.yaml --dry-run
    python -m launch slurm recipes/coconut.py --tasks-per-node 2 --partition debug --time 00:10:00 --wait
    python -m launch slurm recipes/coconut.py --sweep optim.lr=1e-4,3e-4 --sweep run.seed=0,1   # 4-job array
    python -m launch slurm recipes/coconut.py --sweep 'data.augment.crop_scale=[0.5,1.0],[0.7,1.0]'  # 2 jobs
    python -m launch slurm recipes/coconut.py --config runs/coconut-.../config.json   # that run again, on SLURM
    python -m launch status JOBID [--wait]     # state, attempts, restarts and why, result or error, logs
    python -m launch tail JOBID [-f]           # the task's log
    python -m launch cancel JOBID

Every job gets a fixed run directory at submission (printed), so a preempted or timed-out job that
SLURM requeues resumes the same run (attrdist.train.slurm_job). Options come from, in order: the built-in
defaults, the `--profile` YAML file (keys are the long option names with underscores), the command line.
The recipe's overrides are checked here, before anything is queued.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": None, "cpus_per_task": None, "mem": None,
            "partition": None, "time": "01:00:00", "account": None, "qos": None, "constraint": None,
            "max_requeues": 3, "signal_delay_s": 90, "setup": [], "srun_args": [], "sbatch": {},
            "logs": "runs/slurm", "name": None, "array_parallelism": 64}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def fail(msg: str) -> "SystemExit":
    print(f"launch: error: {msg}", file=sys.stderr, flush=True)
    return SystemExit(2)


# ------------------------------------------------------------------ options: defaults < profile < flags
def load_profile(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file() and (ROOT / "slurm" / "profiles" / f"{path}.yaml").is_file():
        p = ROOT / "slurm" / "profiles" / f"{path}.yaml"  # --profile NAME
    if not p.is_file():
        raise fail(f"{path}: no such profile (files live in slurm/profiles/; pass a path or a name there)")
    import yaml

    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise fail(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise fail(f"{p}: a profile is a mapping of option: value (see slurm/profiles/example.yaml)")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise fail(f"{p}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    return data


def resolve_options(flags: dict, profile: str | None) -> dict:
    opts = {**DEFAULTS, **load_profile(profile)}
    opts.update({k: v for k, v in flags.items() if v is not None and k in DEFAULTS})
    if opts["tasks_per_node"] is None:  # one task per GPU; one CPU task otherwise
        opts["tasks_per_node"] = opts["gpus_per_node"] or 1
    if opts["gpus_per_node"] and opts["tasks_per_node"] != opts["gpus_per_node"]:
        raise fail(f"--tasks-per-node {opts['tasks_per_node']} with --gpus-per-node {opts['gpus_per_node']}: attrdist "
                   f"runs one rank per GPU; leave --tasks-per-node out")
    opts["minutes"] = minutes(str(opts["time"]))
    return opts


def minutes(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise fail(f"--time {text!r}: use HH:MM:SS (or D-HH:MM:SS, or minutes)")
    d, a, b, c = m.groups()
    if d is not None:  # D-HH[:MM[:SS]]
        secs = int(d) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:
        secs = int(a) * 60 + int(b)
    else:
        secs = int(a) * 60
    if secs <= 0:
        raise fail(f"--time {text!r}: must be positive")
    return max(1, math.ceil(secs / 60))


# ------------------------------------------------------------------ the recipe's side, checked before queueing
def check_recipe(script: str, recipe_args: list[str], namespace: dict | None = None):
    """The resolved config of `script` with `recipe_args` (unknown keys and bad values fail here), and the parsed
    arguments. `namespace`: the recipe's functions from an earlier call (a sweep loads the recipe once)."""
    from attrdist.errors import AttrdistError
    from attrdist.recipe import parser, resolve
    from attrdist.tasks import check_kind

    path = Path(script)
    ns = namespace or load_recipe(path)
    try:
        args = parser(path.stem).parse_intermixed_args(recipe_args)
    except SystemExit:
        raise fail(f"{script}: bad recipe arguments {recipe_args} (see python {script} --help)") from None
    try:
        cfg, profile = resolve(args, ns["full"], ns["demo"], path.stem)
        check_kind(cfg.data.task)
    except AttrdistError as e:
        raise fail(str(e)) from None
    return cfg, args


def load_recipe(path: Path) -> dict:
    """A recipe file's functions (its full() and demo() configs), without running its __main__."""
    if not path.is_file():
        raise fail(f"{path}: no such recipe (they live in recipes/)")
    ns = runpy.run_path(str(path), run_name="attrdist_recipe")
    if not callable(ns.get("full")) or not callable(ns.get("demo")):
        raise fail(f"{path}: not an attrdist recipe (it defines no full() and demo() configs)")
    return ns


def run_dir_for(cfg, stamp: str, suffix: str = "") -> Path:
    if cfg.run.run_dir:
        base = Path(cfg.run.run_dir)
    else:
        base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
    return (base / suffix if suffix else base).resolve()


def sweep_grid(sweeps: list[str]) -> list[list[str]]:
    """--sweep optim.lr=1e-4,3e-4 --sweep run.seed=0,1 -> the 4 combinations as override lists. A value in
    brackets is one value, as hydra writes lists: data.augment.crop_scale=[0.5,1.0],[0.7,1.0] is 2 values."""
    axes = []
    for s in sweeps:
        if "=" not in s or not s.split("=", 1)[1]:
            raise fail(f"--sweep {s!r}: use key=v1,v2,... (a list value in brackets: key=[0.5,1.0],[0.7,1.0])")
        key, values = s.split("=", 1)
        axes.append([f"{key}={v}" for v in sweep_values(values, s)])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def sweep_values(text: str, whole: str) -> list[str]:
    """'1e-4,3e-4' -> ['1e-4', '3e-4']; '[0.5,1.0],[0.7,1.0]' -> ['[0.5,1.0]', '[0.7,1.0]'] (commas inside
    brackets belong to the value). Unbalanced or nested brackets, or an empty value, fail in one line."""
    values, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise fail(f"--sweep {whole!r}: nested brackets; a value is a flat list like [0.5,1.0]")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise fail(f"--sweep {whole!r}: a ']' without its '['")
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise fail(f"--sweep {whole!r}: a '[' without its ']'")
    values.append(cur)
    for v in values:
        if not v.strip():
            raise fail(f"--sweep {whole!r}: an empty value; use key=v1,v2,... (a list value in brackets)")
        if "[" in v and not (v.strip().startswith("[") and v.strip().endswith("]")):
            raise fail(f"--sweep {whole!r}: {v!r} mixes a bracketed list with other text; write [a,b],[c,d]")
    return values


def slug(overrides: list[str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.=+-]", "-", o) for o in overrides)[:120]


# ------------------------------------------------------------------ submission
def make_executor(opts: dict, name: str):
    import submitit

    folder = Path(opts["logs"]).resolve() / "%j"
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts["max_requeues"])
    extra = {"time": str(opts["time"]), **(opts["sbatch"] or {})}  # the exact --time (submitit rounds to minutes)
    params = dict(job_name=name, nodes=opts["nodes"], ntasks_per_node=opts["tasks_per_node"], time=opts["minutes"],
                  signal_delay_s=int(opts["signal_delay_s"]), additional_parameters=extra,
                  srun_args=["--kill-on-bad-exit=1", *opts["srun_args"]],  # one rank dies: the step ends now
                  setup=[f"export ATTRDIST_SIGNAL_DELAY_S={int(opts['signal_delay_s'])}",
                         "export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${ATTRDIST_CACHE:-$HOME/.cache/attrdist}/torch_extensions}",
                         *opts["setup"]],
                  array_parallelism=opts["array_parallelism"])
    for key in ("partition", "account", "qos", "constraint", "mem", "cpus_per_task"):
        if opts[key] not in (None, ""):
            params[key] = opts[key]
    if opts["gpus_per_node"]:
        params["gpus_per_node"] = opts["gpus_per_node"]
    ex.update_parameters(**params)
    return ex


def jobs_index() -> Path:
    from attrdist.cache import cache_dir

    return cache_dir() / "slurm-jobs"


def remember(job_id: str, info: dict) -> None:
    d = jobs_index()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{job_id}.json.tmp"
    tmp.write_text(json.dumps({"job_id": job_id, **info}, indent=1))
    os.replace(tmp, d / f"{job_id}.json")


def submit(script: str, recipe_args: list[str], flags: dict, *, profile: str | None, sweeps: list[str],
           dry_run: bool, wait: bool) -> int:
    from attrdist.train.slurm_job import RecipeJob

    opts = resolve_options(flags, profile)
    recipe = load_recipe(Path(script))
    cfg, args = check_recipe(script, recipe_args, recipe)
    script = str(Path(script).resolve())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    grid = sweep_grid(sweeps)
    jobs, copies = [], []
    for combo in grid:
        sub_cfg, _ = check_recipe(script, [*recipe_args, *combo], recipe) if combo else (cfg, args)
        run_dir = run_dir_for(sub_cfg, stamp, slug(combo) if len(grid) > 1 else "")
        has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
        if has_ckpt and not (args.resume or sub_cfg.run.resume == "auto"):
            raise fail(f"{run_dir}: already holds a run; pass --resume to continue it, or choose another run.run_dir")
        job_args = [a for a in recipe_args if not a.startswith("run.run_dir=")] + combo + [f"run.run_dir={run_dir}"]
        if "--config" in job_args:  # the job reads its own copy: the file may change before the job starts
            i = job_args.index("--config") + 1
            copy = run_dir / f"submitted-{Path(job_args[i]).name}"
            copies.append((Path(job_args[i]), copy))
            job_args[i] = str(copy)
        jobs.append((RecipeJob(script, job_args, max_requeues=int(opts["max_requeues"]),
                               signal_delay_s=float(opts["signal_delay_s"])), run_dir, combo))
    name = opts["name"] or f"attrdist-{Path(script).stem}"
    ex = make_executor(opts, name)
    ntasks = opts["nodes"] * opts["tasks_per_node"]
    shape = (f"{opts['nodes']} node{'s' * (opts['nodes'] > 1)} x {opts['tasks_per_node']} task"
             f"{'s' * (opts['tasks_per_node'] > 1)} = {ntasks} rank{'s' * (ntasks > 1)}"
             + (f", {opts['gpus_per_node']} GPUs per node" if opts["gpus_per_node"] else " on CPU"))
    if cfg.data.shards and not Path(cfg.data.shards).exists():
        print(f"launch: warning: data.shards={cfg.data.shards} does not exist here; the job fails unless the compute "
              f"nodes see it", file=sys.stderr)
    if dry_run:
        array = (f" as one job array (--array=0-{len(jobs) - 1}%{min(len(jobs), int(opts['array_parallelism']))})"
                 if len(jobs) > 1 else "")
        print(f"launch: would submit {len(jobs)} job{'s' * (len(jobs) > 1)}{array} of {script} ({shape}), "
              f"time {opts['time']}, at most {opts['max_requeues']} requeues")
        for job, run_dir, combo in jobs:
            print(f"  task argv: {shlex.join([Path(script).name, *job.args])}")
        print("sbatch script:")
        print(ex._make_submission_file_text(ex._submitit_command_str, "DRYRUN"))
        return 0
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    if len(jobs) == 1:
        submitted = [ex.submit(jobs[0][0])]
    else:
        with ex.batch():
            submitted = [ex.submit(j) for j, _, _ in jobs]
    for sj, (job, run_dir, combo) in zip(submitted, jobs):
        folder = Path(str(ex.folder).replace("%j", sj.job_id))
        remember(sj.job_id, {"kind": "submitit", "script": script, "args": job.args, "run_dir": str(run_dir),
                             "folder": str(folder), "tasks": ntasks, "submitted": time.time(), "sweep": combo})
        print(f"submitted job {sj.job_id}: {Path(script).name} ({shape}){' ' + ' '.join(combo) if combo else ''}")
        print(f"  run dir: {run_dir}")
        print(f"  logs:    {folder}/{sj.job_id}_0_log.err (and .out; task N: _N_)")
    first = submitted[0].job_id.split("_")[0]
    print(f"  follow:  python -m launch tail {submitted[0].job_id} -f")
    print(f"  status:  python -m launch status {submitted[0].job_id}    cancel: python -m launch cancel {first}",
          flush=True)
    if not wait:
        return 0
    codes = [status(sj.job_id, wait=True) for sj in submitted]
    return max(codes)


# ------------------------------------------------------------------ looking after a job
def lookup(job_id: str) -> dict:
    f = jobs_index() / f"{job_id}.json"
    if f.is_file():
        return json.loads(f.read_text())
    for folder in (Path(DEFAULTS["logs"]) / job_id, ROOT / DEFAULTS["logs"] / job_id):
        if (folder / f"{job_id}_submitted.pkl").is_file():
            return {"job_id": job_id, "kind": "submitit", "folder": str(folder.resolve())}
    return {"job_id": job_id, "kind": "unknown"}


def slurm_state(job_id: str) -> tuple[str, list[dict]]:
    """(state of the latest attempt, every attempt from sacct) — 'UNKNOWN' if SLURM has no record."""
    fields = ["JobID", "State", "ExitCode", "Elapsed", "Start", "End", "Partition", "NodeList"]
    try:
        p = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", ",".join(fields)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise fail(f"sacct: {e} (is this a SLURM login node? SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')})")
    rows = [dict(zip(fields, line.split("|"))) for line in p.stdout.splitlines() if line.strip()]
    rows = [r for r in rows if r["JobID"] == job_id]
    if rows:
        state = rows[-1]["State"].split()[0]
        if state in TERMINAL:  # an attempt that ended NODE_FAIL is requeued by SLURM: the controller knows first
            now = controller_state(job_id)
            if now and now not in TERMINAL:
                return now, rows
        return state, rows
    q = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return (q.stdout.split()[0] if q.returncode == 0 and q.stdout.strip() else "UNKNOWN"), []


def controller_state(job_id: str) -> str | None:
    """The job's state in slurmctld (PENDING for a job it has just requeued, while sacct's latest row may still
    be the failed attempt); None once slurmctld has forgotten the job (MinJobAge) or cannot be asked."""
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bJobState=(\S+)", p.stdout) if p.returncode == 0 else None
    return m.group(1) if m else None


def scontrol_paths(job_id: str) -> dict:
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    out = {}
    for key in ("StdOut", "StdErr"):
        m = re.search(rf"\b{key}=(\S+)", p.stdout)
        if m:
            out[key] = m.group(1)
    return out


def log_files(info: dict, task: int = 0) -> list[Path]:
    job_id = info["job_id"]
    if info.get("folder"):
        folder = Path(info["folder"])
        return [folder / f"{job_id}_{task}_log.err", folder / f"{job_id}_{task}_log.out"]
    paths = info.get("logs") or scontrol_paths(job_id)
    return [Path(p) for p in dict.fromkeys(paths.values())] if isinstance(paths, dict) else [Path(p) for p in paths]


def submitit_outcome(info: dict) -> tuple[str, object] | None:
    """("success", summary) or ("error", traceback text) of task 0, once submitit has written its result
    file; None before. Nothing is unpickled: the summary comes from the run directory (report.json,
    restarts.jsonl) and an error from the traceback submitit prints into task 0's .err log."""
    if info.get("kind") != "submitit":
        return None
    folder, jid = Path(info["folder"]), info["job_id"]
    if not (folder / f"{jid}_0_result.pkl").is_file():
        return None
    err = folder / f"{jid}_0_log.err"
    text = err.read_text(errors="replace") if err.is_file() else ""
    last_start = text.rfind("attrdist.train.slurm_job: slurm(job ")  # the last attempt's part of the appended log
    attempt = text[last_start:] if last_start >= 0 else text
    if "Submitted job triggered an exception" in attempt:
        return "error", attempt
    from attrdist.train.slurm_job import summary

    return "success", summary(Path(info["run_dir"])) if info.get("run_dir") else {}


def error_line(tb: str) -> str:
    """The error of a job's traceback (RecipeFailed's one line if it is there), without module paths."""
    lines = [ln for ln in str(tb).strip().splitlines() if ln.strip()]
    failed = [m.group(1) for ln in lines if (m := re.search(r"RecipeFailed: (.*)$", ln))]
    return failed[-1] if failed else re.sub(r"^\[rank\d+\]: ", "", lines[-1])


def status(job_id: str, *, wait: bool = False, poll_s: float = 2.0) -> int:
    """Print the job's state and outcome; 0 if it completed, 1 if it failed, 3 if still going (no --wait)."""
    info = lookup(job_id)
    state, rows = slurm_state(job_id)
    outcome = submitit_outcome(info)
    t0 = time.time()
    while wait and (state not in TERMINAL or (state == "COMPLETED" and info.get("kind") == "submitit"
                                               and outcome is None and _recent(rows))):
        if state == "UNKNOWN" and time.time() - t0 > 60:
            raise fail(f"job {job_id}: neither sacct nor squeue knows it (check the id; SLURM_CONF="
                       f"{os.environ.get('SLURM_CONF', 'unset')})")
        time.sleep(poll_s)
        state, rows = slurm_state(job_id)
        info = lookup(job_id) if info["kind"] == "unknown" else info  # an sbatch job records itself when it starts
        outcome = submitit_outcome(info)
    attempts = len(rows)
    head = f"job {job_id}"
    if info.get("script"):
        head += f" ({Path(info['script']).name}, {info.get('tasks', '?')} rank{'s' * (info.get('tasks', 1) != 1)})"
    last = rows[-1] if rows else {}
    print(f"{head}: {state}" + (f", exit {last['ExitCode']}, elapsed {last['Elapsed']}" if last else "")
          + (f", {attempts} attempts" if attempts > 1 else ""))
    run_dir = info.get("run_dir")
    if run_dir:
        print(f"  run dir:  {run_dir}")
        from attrdist.train.slurm_job import read_restarts

        for r in read_restarts(Path(run_dir)):
            what = "requeued" if r.get("requeued", True) else "not requeued (limit reached)"
            step = f" after step {r['step']}" if r.get("step") is not None else ""
            print(f"  restart:  {r.get('restart') or '-'} {r['reason']}{step}, {what}")
    if outcome and outcome[0] == "success":
        res = outcome[1]
        print(f"  result:   {res.get('headline')}")
        print(f"  report:   {res.get('report')}")
    elif outcome and outcome[0] == "error":
        print(f"  error:    {error_line(outcome[1])}")
    elif state in TERMINAL and state != "COMPLETED":
        tail = _error_from_logs(info)
        if tail:
            print(f"  error:    {tail}")
    elif run_dir and (Path(run_dir) / "report.json").is_file():
        rep = json.loads((Path(run_dir) / "report.json").read_text())
        print(f"  result:   {rep.get('headline')}")
        print(f"  report:   {Path(run_dir) / 'report.md'}")
    failures = srun_failures(info)
    for n, what in enumerate(failures, 1):  # srun reports a failure as the attempt ends
        if what:
            print(f"  failed:   {f'attempt {n}: ' if len(failures) > 1 else ''}{what}")
    logs = log_files(info)
    if logs:
        print(f"  logs:     {', '.join(map(str, logs))}")
    if state not in TERMINAL:
        return 3
    ok = state == "COMPLETED" and (outcome is None or outcome[0] == "success")
    return 0 if ok else 1


def _recent(rows: list[dict]) -> bool:
    """A completed job's result file may lag the state by a moment; wait for it at most ~20 s."""
    end = rows[-1].get("End", "") if rows else ""
    try:
        return time.time() - time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S")) < 20
    except ValueError:
        return False


SRUN_TASK = re.compile(r"^srun: error: (\S+): tasks? ([0-9,-]+): (.+)$", re.M)
SRUN_NODE = re.compile(r"^srun: error: Node failure on (\S+)$", re.M)
ATTEMPT = re.compile(r"^(?:attrdist\.train\.slurm_job: slurm\(job |attrdist: job \S+ restart )", re.M)


def srun_failures(info: dict) -> list[str | None]:
    """What srun saw fail first in each attempt of the job (None where nothing failed): a node ("node attrdist-n2
    failed (srun: Node failure on attrdist-n2)"), else the first task, as "task 1 on attrdist-n2: Killed (srun:
    the first task to fail)": which rank on which node, whatever the ranks themselves managed to log (a rank
    killed by a signal, or on a node that went down, logs nothing). A node failure comes first even when srun
    reports it after the tasks that exited because of it. From the batch script's log (task 0's for submitit),
    whose attempts begin at attrdist's first line of each; [] when there is no log."""
    for f in log_files(info):
        if f.is_file():
            text = f.read_text(errors="replace")
            starts = [m.start() for m in ATTEMPT.finditer(text)]  # what precedes the first belongs to it
            bounds = [0, *starts[1:], len(text)]
            return [_srun_failure(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    return []


def _srun_failure(text: str) -> str | None:
    node = SRUN_NODE.search(text)
    if node:
        return f"node {node.group(1)} failed (srun: Node failure on {node.group(1)})"
    m = SRUN_TASK.search(text)
    if m:
        tasks = m.group(2)
        return (f"task{'s' * (',' in tasks or '-' in tasks)} {tasks} on {m.group(1)}: {m.group(3).strip()} "
                f"(srun: the first task to fail)")
    return None


def _error_from_logs(info: dict) -> str | None:
    for f in log_files(info):
        if f.is_file():
            lines = [ln for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
            hits = [ln for ln in lines if ln.startswith("attrdist: error:") or "Error" in ln.split(":")[0]]
            if hits:
                return hits[-1]
    return None


def tail(job_id: str, *, follow: bool, lines: int, task: int) -> int:
    info = lookup(job_id)
    files = [f for f in log_files(info, task) if f.is_file() or follow]
    if not files:
        raise fail(f"job {job_id}: no log files found (not submitted from here, or not started yet); "
                   f"python -m launch status {job_id}")
    cmd = ["tail", "-n", str(lines), *(["-F"] if follow else []), *map(str, files)]
    return subprocess.call(cmd)


def cancel(job_id: str) -> int:
    rc = subprocess.call(["scancel", job_id])
    if rc == 0:
        print(f"cancelled job {job_id}")
    return rc


def task(script: str, recipe_args: list[str], *, max_requeues: int) -> int:
    """`srun python -m launch task ...`: this task's rank of the recipe (the sbatch template's path)."""
    from attrdist.errors import AttrdistError
    from attrdist.train.slurm_job import RecipeFailed, job_environment, run_task

    try:
        env = job_environment()
        if env.global_rank == 0 and not os.environ.get("SLURM_RESTART_COUNT", "0").strip("0"):
            from attrdist.train.slurm_job import _arg

            run_dir = _arg(recipe_args, "run.run_dir")
            remember(env.job_id, {"kind": "sbatch", "script": str(Path(script).resolve()), "args": recipe_args,
                                  "run_dir": str(Path(run_dir).resolve()) if run_dir else None,
                                  "logs": scontrol_paths(env.job_id), "tasks": env.num_tasks,
                                  "submitted": time.time()})
        result = run_task(script, recipe_args, max_requeues=max_requeues)
    except AttrdistError as e:
        print(f"attrdist: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RecipeFailed as e:
        print(str(e), file=sys.stderr, flush=True)
        return 1
    if env.global_rank == 0:
        print(f"attrdist.train.slurm_job: done: {result['headline']} (report: {result['report']})", file=sys.stderr, flush=True)
    return 0
