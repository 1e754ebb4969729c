"""Shared fixtures: a small real demo dataset packed by the real COCO packer, and a runner for
recipes as real subprocesses (the way users run them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEMO_VOCAB = ROOT / "recipes" / "coconut_demo_vocab.json"


def pytest_collection_modifyitems(config, items) -> None:
    """`cuda` tests (tests/test_cuda.py) skip where torch sees no CUDA device, with the reason and where they run.
    The mark is added at collection, so the skip comes before any of their fixtures builds data."""
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no CUDA device (torch {torch.__version__}, CUDA build "
                                   f"{torch.version.cuda or 'none'}: torch.cuda.is_available() is False); these run on "
                                   f"a GPU machine: `make gpu-check` / `python -m bench.gpu` (or `pytest -m cuda`)")
    for item in cuda:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small demo dataset in COCO formats (train 96 / val 32 / test 32 images)."""
    from attrdist.demo.scenes import DemoSpec, ensure_demo

    root = tmp_path_factory.mktemp("demo") / "coco"
    return ensure_demo(root, DemoSpec(seed=0, n_train=96, n_val=32, n_test=32), progress=False)


@pytest.fixture(scope="session")
def small_shards(small_demo, tmp_path_factory) -> Path:
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    out = tmp_path_factory.mktemp("shards") / "demo-shards"
    ann = small_demo / "annotations"
    splits = [SplitSource(s, small_demo / "images", ann / f"captions_{s}.json", ann / f"instances_{s}.json")
              for s in ("train", "val", "test")]
    pack_coco_captions(out, splits, load_vocabulary(DEMO_VOCAB), dataset="test-demo", vocab_path=DEMO_VOCAB,
                       max_samples=40, progress=False)
    return out


@pytest.fixture(scope="session")
def cocottributes_shards(small_demo, tmp_path_factory) -> Path:
    """The demo's objects with simulated COCO Attributes votes, through the real pickle packer."""
    from attrdist.pack.cocottributes import pack_cocottributes
    from attrdist.demo.cocottributes import OBJECT_ATTRIBUTES, write_pickle

    tmp = tmp_path_factory.mktemp("cocottributes")
    pkl = write_pickle(small_demo, tmp / "votes.pkl")
    ann = small_demo / "annotations"
    m = pack_cocottributes(tmp / "shards", pkl, [ann / "instances_train.json", ann / "instances_val.json"],
                           [small_demo / "images"], dataset="test-cocottributes", min_size=12, progress=False)
    assert m["attributes"] == list(OBJECT_ATTRIBUTES)
    return tmp / "shards"


@pytest.fixture(scope="session")
def aerial_shards(tmp_path_factory) -> Path:
    """Small procedural aerial scenes in DIOR's layout, through the real DIOR packer."""
    from attrdist.demo.aerial import AerialSpec, ensure_aerial
    from attrdist.pack.dior import pack_dior

    tmp = tmp_path_factory.mktemp("aerial")
    root = ensure_aerial(tmp / "dior", AerialSpec(n_train=64, n_val=16, n_test=16), progress=False)
    pack_dior(root, tmp / "shards", dataset="test-aerial", progress=False)
    return tmp / "shards"


def sigint_as_in_a_terminal() -> None:
    """Popen(preexec_fn=...) for a child that a test Ctrl-C's: SIGINT at its default action, as for a command
    typed at a terminal. A test run started in the background by a non-interactive shell (`make test &`)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler in the child (seen: the
    packer finished its pass and the Ctrl-C tests failed, in a run started as `bash ... &`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("ATTRDIST_EXPECT_WORLD_SIZE", None)
    return env


# Small, fast settings for the demo profile on test shards.
FAST = ["data.batch_size=16", "data.num_workers=0", "run.epochs=2", "run.eval_every=1", "run.log_every=1",
        "model.dim=64", "model.contrastive_dim=32", "run.precision=fp32", "run.threads=1"]


def run_recipe(args: list[str], *, timeout: float = 300, env: dict | None = None, check: bool = True,
               launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "recipes" / "coconut.py"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-6000:]}\nSTDERR:\n{p.stderr[-6000:]}")
    return p


def packer_main(script: str, *args) -> subprocess.CompletedProcess:
    """shards/<script>.py's main() run in this process, with --quiet: the CLI's code path (argument parsing,
    one-line errors, exit status, what it prints) without a new interpreter's start-up."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location(f"shards_{script}", ROOT / "shards" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            mod.main([*map(str, args), "--quiet"])
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and one line `attrdist: error: ...` on stderr holding every needle; returns the line."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attrdist: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def train_steps(metrics: Path) -> list[int]:
    """The optimizer steps logged in a metrics.jsonl (a torn last line after SIGKILL is skipped)."""
    import json

    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "train":
            out.append(rec["step"])
    return out


def assert_tensors_equal(ta: dict, tb: dict, what: str = "") -> None:
    """Bitwise (torch.equal) equality of two name -> tensor dicts, naming the first few that differ."""
    import torch

    assert ta.keys() == tb.keys(), f"{what}different tensor names"
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{what}{len(differ)} tensors differ, e.g. {differ[:3]}"
