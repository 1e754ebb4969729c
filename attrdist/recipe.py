"""What every recipe's `__main__` does: parse `key=value` overrides, pick the profile, run.

    python recipes/coconut.py --help                 # every key, its default and meaning
    python recipes/coconut.py optim.lr=3e-4          # demo profile (no data configured)
    python recipes/coconut.py data.shards=/data/coconut-shards   # full profile
    python recipes/coconut.py --resume run.run_dir=runs/coconut-20261123-101500

The profile is `full` when data.shards is given (or --profile full), else `demo`: the built-in
demo dataset is generated into the cache on first use and packed by the real COCO packer.

    python recipes/coconut.py --config runs/coconut-demo-20261123-101500/config.json   # that run, again
    python recipes/coconut.py --config my.yaml optim.lr=3e-4                            # a partial file

`--config FILE` (.json, .yaml/.yml) applies the file over the profile's defaults, then the key=value
overrides apply over both. The file may be a run's whole config.json or name only some keys, nested
({"optim": {"lr": 3e-4}}) or dotted ({"optim.lr": 3e-4}); a key this attrdist does not know stops the
run (it would not be honoured). A file says how to train, not where: its run.run_dir and run.resume are
not used, so reproducing a run makes a new run directory; `--resume` continues the file's own run (its
run.run_dir, or the run directory that holds the config.json). With a file that sets data.shards the
profile defaults to `full`; the profile only supplies the keys the file leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from attrdist.core.config import Config, apply_mapping, apply_overrides, config_leaves, help_text
from attrdist.errors import AttrdistError, user_errors


def parser(name: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"recipes/{name}.py", add_help=False,
                                 description=f"attrdist recipe {name!r}. Arguments are key=value config overrides.")
    ap.add_argument("-h", "--help", action="store_true", help="list every config key with its default")
    ap.add_argument("--profile", choices=("full", "demo"), help="default: full if data.shards is set, else demo")
    ap.add_argument("--config", metavar="FILE", help="a config file (.json/.yaml) applied over the profile before the "
                                                   "key=value overrides: a run's config.json reproduces that run in a "
                                                   "new run directory; partial files (nested or dotted keys) work")
    ap.add_argument("--resume", action="store_true", help="same as run.resume=auto (with --config: the file's run)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def resolve(args: argparse.Namespace, full: Callable[[], Config], demo: Callable[[], Config],
            recipe: str | None = None) -> tuple[Config, str]:
    """(config with the file and the overrides applied, profile name) for parsed recipe arguments.
    `recipe`: this recipe's name, checked against a config.json's "recipe"."""
    overrides = list(args.overrides) + (["run.resume=auto"] if args.resume else [])
    leaves = read_config_file(args.config, recipe) if getattr(args, "config", None) else {}
    if args.resume and leaves and not any(o.startswith("run.run_dir=") for o in overrides):
        own = file_run_dir(args.config, leaves)
        overrides = ([f"run.run_dir={own}"] if own else []) + overrides
    leaves = {k: v for k, v in leaves.items() if k not in RUN_IDENTITY}
    wants_data = (any(o.startswith("data.shards=") and o.split("=", 1)[1] for o in overrides)
                  or bool(leaves.get("data.shards")))
    profile = args.profile or ("full" if wants_data else "demo")
    base = full() if profile == "full" else demo()
    if leaves:
        base = apply_mapping(base, leaves, args.config)
    return apply_overrides(base, overrides), profile


RUN_IDENTITY = ("run.run_dir", "run.resume")  # where a run was and whether it continued: not taken from a file


def read_config_file(path: str, recipe: str | None = None) -> dict:
    """A config file (.json, .yaml/.yml) as dotted key -> value; a run's config.json's "recipe" must be `recipe`."""
    p = Path(path)
    if not p.is_file():
        raise AttrdistError(f"--config {path}: no such file")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise AttrdistError(f"--config {path}: expected a .json or .yaml/.yml file")
    text = p.read_text()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise AttrdistError(f"{path}: not valid JSON ({e})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise AttrdistError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if data is None:
        data = {}
    if isinstance(data, dict) and "recipe" in data:  # written by a run (Trainer: {"recipe": ..., **config})
        data = dict(data)
        written_by = data.pop("recipe")
        if recipe and written_by != recipe:
            raise AttrdistError(f"{path}: written by recipe {written_by!r}, not {recipe!r}; run recipes/{written_by}.py "
                                f"--config {path} (or drop its \"recipe\" key to use its settings here)")
    return config_leaves(data, str(path))


def file_run_dir(path: str, leaves: dict) -> str:
    """The run a config file belongs to, for --resume: its run.run_dir, else the folder holding the file when
    that folder is a run directory (a run's config.json beside its checkpoints); '' if neither."""
    if leaves.get("run.run_dir"):
        return str(leaves["run.run_dir"])
    folder = Path(path).resolve().parent
    return str(folder) if (folder / "checkpoints").is_dir() else ""


def main(name: str, full: Callable[[], Config], demo: Callable[[], Config], *, demo_data: Callable[[], Path],
         prepare: Callable[[Config], Config] = lambda cfg: cfg, argv: list[str] | None = None) -> None:
    """`prepare` runs on the resolved config once the data is known (e.g. demo_clip)."""
    ap = parser(name)
    args = ap.parse_intermixed_args(argv)  # key=value on either side of --resume
    with user_errors():
        cfg, profile = resolve(args, full, demo, name)
        if args.help:
            ap.print_help()
            print(f"\nProfile shown: {profile}. Config keys (key=default):")
            print(help_text(cfg))
            return
        if args.print_config:
            from attrdist.core.config import to_json

            print(to_json(cfg))
            return
        if not cfg.data.shards:
            if profile == "full":
                raise AttrdistError("data.shards is empty: pack your data (python shards/coco.py --help) and pass "
                                    "data.shards=DIR, or run the demo profile")
            cfg = replace(cfg, data=replace(cfg.data, shards=str(demo_data())))
        cfg = prepare(cfg)
        from attrdist.train.trainer import Trainer
        try:
            Trainer(cfg, name).train()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the gloo group outlives the run: see the function
                from attrdist.train.runtime import exit_without_native_teardown

                exit_without_native_teardown()
        except RuntimeError as e:  # gloo/NCCL: "Timed out waiting 1800000ms for recv operation to complete"
            err = _collective_error(e, cfg)
            if err is e:
                raise  # not a collective's failure (e.g. a DataLoader's): the original error, untouched
            raise err from None


PEER_GONE = re.compile(r"reset by peer|closed by peer|Broken pipe|remote process exited")  # gloo's, NCCL's


def _collective_error(e: RuntimeError, cfg: Config) -> BaseException:
    """A collective's failure as one line: a timeout (a rank stuck or dead, or its node silent), or a peer whose
    connection broke mid-collective (a rank that crashed or was killed, or its node went down), named with its
    rank and node where the error gives its address (attrdist.train.nodes.peer_at). Anything else: `e` as is."""
    text = str(e)
    if not _in_process_group():
        return e
    first = text.splitlines()[0][:200] if text else type(e).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return AttrdistError(f"a collective timed out after run.dist_timeout_s={cfg.run.dist_timeout_s} s: another "
                             f"rank is stuck or died (its log says why); resume with --resume once it is fixed "
                             f"({first[:160]})")
    if PEER_GONE.search(text):
        from attrdist.train.nodes import peer_at

        who = peer_at(text) or "another rank"
        return AttrdistError(f"{who} is gone: its connection broke in the middle of a collective (it crashed or was "
                             f"killed, or its node went down; its log says why); resume with --resume once it is "
                             f"fixed ({first})")
    return e


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run a recipe: python recipes/coconut.py --help")
