"""What every recipe's `__main__` does: parse `key=value` overrides, pick the profile, run.

    python recipes/coconut.py --help                 # every key, its default and meaning
    python recipes/coconut.py optim.lr=3e-4          # demo profile (no data configured)
    python recipes/coconut.py data.shards=/data/coconut-shards   # full profile
    python recipes/coconut.py --resume run.run_dir=runs/coconut-20261123-101500

The profile is `full` when data.shards is given (or --profile full), else `demo`: the built-in
demo dataset is generated into the cache on first use and packed by the real COCO packer.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from attrdist.core.config import Config, apply_overrides, help_text
from attrdist.errors import AttrdistError, user_errors


def parser(name: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"recipes/{name}.py", add_help=False,
                                 description=f"attrdist recipe {name!r}. Arguments are key=value config overrides.")
    ap.add_argument("-h", "--help", action="store_true", help="list every config key with its default")
    ap.add_argument("--profile", choices=("full", "demo"), help="default: full if data.shards is set, else demo")
    ap.add_argument("--resume", action="store_true", help="same as run.resume=auto")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def resolve(args: argparse.Namespace, full: Callable[[], Config], demo: Callable[[], Config]) -> tuple[Config, str]:
    """(config with the overrides applied, profile name) for parsed recipe arguments."""
    overrides = list(args.overrides) + (["run.resume=auto"] if args.resume else [])
    wants_data = any(o.startswith("data.shards=") and o.split("=", 1)[1] for o in overrides)
    profile = args.profile or ("full" if wants_data else "demo")
    base = full() if profile == "full" else demo()
    return apply_overrides(base, overrides), profile


def main(name: str, full: Callable[[], Config], demo: Callable[[], Config], *, demo_data: Callable[[], Path],
         prepare: Callable[[Config], Config] = lambda cfg: cfg, argv: list[str] | None = None) -> None:
    """`prepare` runs on the resolved config once the data is known (e.g. demo_clip)."""
    ap = parser(name)
    args = ap.parse_intermixed_args(argv)  # key=value on either side of --resume
    with user_errors():
        cfg, profile = resolve(args, full, demo)
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
            if not (_in_process_group() and ("timed out" in str(e).lower() or "timeout" in str(e).lower())):
                raise  # not a collective's timeout (e.g. a DataLoader's): the original error, untouched
            raise AttrdistError(f"a collective timed out after run.dist_timeout_s={cfg.run.dist_timeout_s} s: another "
                                f"rank is stuck or died (its log says why); resume with --resume once it is fixed "
                                f"({str(e).splitlines()[0][:160]})") from None


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run a recipe: python recipes/coconut.py --help")
