"""Real training runs of the coconut recipe as subprocesses: outputs, overfit, resume, bad input."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, ROOT, run_env, run_recipe, train_steps


def demo_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--profile", "demo", f"data.shards={shards}", f"run.run_dir={run_dir}", *FAST, *extra]


@pytest.fixture(scope="module")
def trained_run(small_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "short"
    run_recipe(demo_args(small_shards, run_dir))
    return run_dir


def test_short_run_writes_every_output(trained_run: Path):
    r = trained_run
    for name in ("config.json", "metrics.jsonl", "train.log", "curves.png", "report.md", "report.json"):
        assert (r / name).is_file(), name
    assert any((r / "tensorboard").iterdir())
    recs = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["type"] == "train"]
    evals = [x for x in recs if x["type"] == "eval"]
    assert [x["step"] for x in train] == list(range(1, 13))  # 96 / 16 = 6 steps x 2 epochs, every step logged
    assert all({"loss", "lr", "img_per_s"} <= x.keys() for x in train)
    assert len(evals) == 2 and "val/true_labels/mAP" in evals[0] and "val/true_labels/mAP:prior" in evals[0]
    report = (r / "report.md").read_text()
    first_map = report.split("**Validation mAP against `true_labels`: ")[1].split("**")[0]
    assert 0 <= float(first_map) <= 1
    assert "prior baseline" in report and "all-negative baseline" in report and "worst 20" in report
    assert "## test vs `true_labels`" in report
    cfg = json.loads((r / "config.json").read_text())
    assert cfg["recipe"] == "coconut" and cfg["data"]["batch_size"] == 16
    # checkpoints: safetensors weights + a state file that loads with weights_only=True
    best = json.loads((r / "checkpoints" / "best.json").read_text())["dir"]
    ck = r / "checkpoints" / best
    assert load_file(str(ck / "model.safetensors"))
    state = torch.load(ck / "state.pt", weights_only=True)
    assert {"optimizer", "loop"} <= state.keys()
    meta = json.loads((ck / "meta.json").read_text())
    assert len(meta["attributes"]) == 21 and set(meta["files"]) == {"model.safetensors", "state.pt"}
    assert not list((r / "checkpoints").glob(".*"))  # no temporary files left
    # what the first step really got (attrdist.train.input_check): pinning is asked on CUDA only
    (line,) = [x for x in (r / "train.log").read_text().splitlines() if "input checked: " in x]
    assert line.endswith("input checked: host batch pinned=False, model input channels_last=True, conv weights "
                         "channels_last=True (17 of 17), on cpu"), line


def test_predict_prints_top_attributes(trained_run: Path, small_demo: Path):
    img = next((small_demo / "images" / "val").glob("*.jpg"))
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "predict", str(trained_run), str(img), "--top", "3"],
                       cwd=ROOT, capture_output=True, text=True, env=run_env())
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stdout.splitlines() if x.startswith(str(img))][0]
    names = [part.split(" (")[0] for part in line.split(": ", 1)[1].split(", ")]
    assert len(names) == 3 and len(set(names)) == 3  # three different attributes, with probabilities


def test_predict_in_batches_matches_one_image_at_a_time(trained_run: Path, small_demo: Path):
    from attrdist.predict import load_for_inference, predict_images

    imgs = [str(p) for p in sorted((small_demo / "images" / "val").glob("*.jpg"))[:5]]
    model, cfg, attrs, _ = load_for_inference(trained_run)
    batched = predict_images(model, cfg, attrs, imgs, top=4, batch_size=4)  # a full batch and a batch of 1
    single = [predict_images(model, cfg, attrs, [p], top=4, batch_size=1)[0] for p in imgs]
    assert len(batched) == 5
    for b, s in zip(batched, single):  # bf16 autocast where the CPU has it: equal up to rounding
        db, ds = dict(b), dict(s)
        common = db.keys() & ds.keys()
        assert len(common) >= 3 and all(abs(db[n] - ds[n]) < 0.02 for n in common), (b, s)


def test_config_json_records_concrete_preprocessing(trained_run: Path):
    """The demo's resnet18 (timm's pretrained cfg: ImageNet mean/std, bicubic): config.json and the checkpoint
    record the values the run used; the recipe's own image_size/eval_resize are kept."""
    data = json.loads((trained_run / "config.json").read_text())["data"]
    assert data["mean"] == [0.485, 0.456, 0.406] and data["std"] == [0.229, 0.224, 0.225]
    assert data["interpolation"] == "bicubic" and data["image_size"] == 64 and data["eval_resize"] == 1.0
    best = json.loads((trained_run / "checkpoints" / "best.json").read_text())["dir"]
    assert json.loads((trained_run / "checkpoints" / best / "meta.json").read_text())["config"]["data"] == data
    assert "preprocessing: data.image_size=64 (set by the recipe" in (trained_run / "train.log").read_text()


def _predict_cli(*args, capsys) -> tuple[int, str, str]:
    from attrdist import cli

    try:
        cli.main(["predict", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_thresholds_jsonl_batches_and_device(trained_run: Path, small_demo: Path, tmp_path, capsys):
    """--thresholds val lists what is at or above report.json's val-tuned thresholds (of the headline label
    field), --jsonl holds the same as the text, --batch-size changes nothing but the batching, --device cpu."""
    import numpy as np

    imgs = [str(p) for p in sorted((small_demo / "images" / "val").glob("*.jpg"))[:5]]
    code, out, err = _predict_cli(trained_run, *imgs, "--top", "21", "--thresholds", "val", "--jsonl",
                                  tmp_path / "p.jsonl", "--batch-size", "2", "--device", "cpu", capsys=capsys)
    assert code == 0, err
    assert "on cpu" in out and "thresholds tuned on val against `true_labels`" in out and "bicubic" in out
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == imgs
    report = json.loads((trained_run / "report.json").read_text())
    meta = json.loads((trained_run / "checkpoints" / Path(report["best_checkpoint"]).name / "meta.json").read_text())
    t = dict(zip(meta["attributes"], report["thresholds"]["true_labels"]))
    lines = [x for x in out.splitlines() if not x.startswith("#")]
    assert len(lines) == 5
    for r, line in zip(rows, lines):
        probs = dict(r["top"])  # --top 21: every attribute
        assert len(probs) == 21
        want = sorted((n for n in probs if probs[n] >= t[n]), key=lambda n: -probs[n])
        assert [n for n, _ in r["predicted"]] == want
        assert line.startswith(r["path"] + ": ") and line.endswith(
            " | above thresholds: " + (", ".join(f"{n} ({probs[n]:.3f})" for n in want) or "none"))
    assert any(r["predicted"] for r in rows) and len({float(v) for v in t.values()}) > 1  # per attribute
    # one batch of 64 instead of batches of 2: the same numbers (fp32 here: run.precision=fp32)
    code, _, err = _predict_cli(trained_run, *imgs, "--top", "21", "--thresholds", "val", "--jsonl",
                                tmp_path / "q.jsonl", capsys=capsys)
    assert code == 0, err
    again = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    for a, b in zip(rows, again):
        assert [n for n, _ in a["predicted"]] == [n for n, _ in b["predicted"]]
        assert np.allclose([p for _, p in a["top"]], [p for _, p in b["top"]], atol=1e-5)


def test_predict_refusals_are_one_line_and_leave_no_jsonl(trained_run: Path, small_demo: Path, tmp_path, capsys):
    img = str(next((small_demo / "images" / "val").glob("*.jpg")))
    out = tmp_path / "p.jsonl"
    cases = [(["--thresholds", "test"], "--thresholds test: the thresholds a run has are those tuned on val"),
             (["--thresholds", "val:nope"], "has no thresholds for label field 'nope' (has: labels, true_labels)"),
             (["--batch-size", "0"], "--batch-size 0: must be >= 1")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: not available on this machine (use --device auto)"))
    for extra, message in cases:
        code, _, err = _predict_cli(trained_run, img, "--jsonl", out, *extra, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    # thresholds belong to the checkpoint they were tuned with: another step of the run is refused
    ck = trained_run / "checkpoints"
    best = json.loads((ck / "best.json").read_text())["dir"]
    other = next((d for d in sorted(ck.glob("step-*")) if d.name != best), None)
    if other is not None:
        code, _, err = _predict_cli(other, img, "--thresholds", "val", "--jsonl", out, capsys=capsys)
        assert code == 2 and f"tuned its thresholds for checkpoint {best}, not {other.name}" in err
    # a run without report.json (unfinished)
    bare = tmp_path / "unfinished"
    shutil.copytree(ck, bare / "checkpoints")
    code, _, err = _predict_cli(bare, img, "--thresholds", "val", "--jsonl", out, capsys=capsys)
    assert code == 2 and "report.json not found" in err
    # an image that fails mid-way: the JSON lines file is not left half-written
    code, _, err = _predict_cli(trained_run, img, str(tmp_path / "missing.jpg"), "--batch-size", "1", "--jsonl", out,
                                capsys=capsys)
    assert code == 2 and "missing.jpg: image not found" in err
    assert not out.exists() and not list(tmp_path.glob(".p.jsonl*"))


def test_overfit_drives_loss_to_zero(small_shards, tmp_path):
    run_recipe(demo_args(small_shards, tmp_path / "overfit", "run.overfit_batches=1", "run.epochs=80",
                         "run.eval_every=80", "optim.lr=3e-3", "optim.weight_decay=0", "schedule.name=constant",
                         "schedule.warmup_epochs=0", "model.dropout=0"))
    train = [json.loads(x) for x in (tmp_path / "overfit" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x]
    assert train[0]["bce"] > 0.3
    assert train[-1]["bce"] < 0.02, train[-1]


def test_kill_mid_epoch_then_resume_matches_uninterrupted(small_shards, tmp_path):
    """SIGKILL after a mid-epoch checkpoint, resume, and end with the same weights as a run never killed."""
    extra = ("run.epochs=2", "run.ckpt_every_steps=2", "run.eval_every=2", "model.dropout=0.1")
    ref = tmp_path / "ref"
    run_recipe(demo_args(small_shards, ref, *extra))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "recipes" / "coconut.py"), *demo_args(small_shards, run_dir, *extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (max(train_steps(run_dir / "metrics.jsonl"), default=0) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = run_dir / "checkpoints"
    last = json.loads((ck / "last.json").read_text())
    assert 2 <= last["step"] < 12 and last["step"] % 6 != 0  # a mid-epoch checkpoint (6 steps per epoch)
    for d in ck.glob("step-*"):  # every visible checkpoint is complete
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "state.pt", "meta.json"}
    p = run_recipe(demo_args(small_shards, run_dir, *extra) + ["--resume"])
    assert f"step {last['step']}" in p.stdout and "resumed from" in p.stdout
    assert (run_dir / "report.md").is_file()
    a = load_file(str(ref / "checkpoints" / json.loads((ref / "checkpoints/last.json").read_text())["dir"] / "model.safetensors"))
    b = load_file(str(ck / json.loads((ck / "last.json").read_text())["dir"] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_grad_accum_early_stopping_and_debug(small_shards, tmp_path):
    run_recipe(demo_args(small_shards, tmp_path / "ga", "optim.grad_accum=2", "run.epochs=1"))
    assert [r["step"] for r in _records(tmp_path / "ga", "train")] == [1, 2, 3]  # 6 batches / 2 per step
    # with a negligible lr the model barely moves (only BN statistics): patience 1 stops at the first
    # evaluation that does not beat the best so far
    run_recipe(demo_args(small_shards, tmp_path / "es", "run.epochs=12", "run.patience=1", "optim.lr=1e-30"))
    values = [r["val/labels/mAP"] for r in _records(tmp_path / "es", "eval")]
    first_bad = next(i for i in range(1, len(values)) if values[i] <= max(values[:i]))
    assert len(values) == first_bad + 1 < 12
    assert "(early stop)" in (tmp_path / "es" / "report.md").read_text()
    p = run_recipe(demo_args(small_shards, tmp_path / "dbg", "run.debug=true"))
    assert "shape backbone.conv1" in p.stdout and "shape attr_proj" in p.stdout
    assert [r["step"] for r in _records(tmp_path / "dbg", "train")] == [1, 2, 3]


def test_run_dir_in_use_needs_resume(trained_run, small_shards):
    p = run_recipe(demo_args(small_shards, trained_run), check=False)
    assert p.returncode == 2 and "already holds a run; pass --resume" in p.stderr


@pytest.mark.distributed
def test_two_cpu_processes_really_train_as_two_ranks(small_shards, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "launch", "local", "recipes/coconut.py", "--nproc", "2",
           *demo_args(small_shards, run_dir)]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    log = (run_dir / "train.log").read_text()
    assert "distributed run verified: 2 ranks (MULTI_CPU, backend gloo)" in log
    assert "world_size=2" in log and "(8 per rank x 2 ranks)" in log
    assert (run_dir / "report.md").is_file()


def test_fewer_ranks_than_asked_fails_loudly(small_shards, tmp_path):
    p = run_recipe(demo_args(small_shards, tmp_path / "r", "run.world_size=2"), check=False)
    assert p.returncode == 2
    assert "asked for 2 processes (run.world_size) but this process sees world size 1" in p.stderr
    # the silent trap: `accelerate launch --cpu --num_processes 2` starts ONE process
    p = run_recipe(demo_args(small_shards, tmp_path / "r2"), check=False,
                   launcher=[sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"])
    assert p.returncode != 0
    assert "asked for 2 processes (accelerate launch --num_processes) but this process sees world size 1" in p.stderr


def _corrupt_copy(src: Path, dst: Path, bad: set[int]) -> Path:
    """Copy a packed dataset, replacing the JPEG bytes of some train samples by broken ones."""
    import shutil

    shutil.copytree(src, dst)
    shard = dst / "train-000000.tar"
    members = []
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            members.append((m, t.extractfile(m).read()))
    with tarfile.open(shard, "w") as t:
        for k, (m, data) in enumerate(members):
            if m.name.endswith(".jpg") and k // 2 in bad:
                data = data[:200] if k % 4 == 0 else b"\xff\xd8\xff\xe0" + bytes(reversed(data[4:]))
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return dst


def test_corrupt_jpegs_are_skipped_and_counted_then_limit_stops(small_shards, tmp_path):
    bad = _corrupt_copy(small_shards, tmp_path / "bad", {0, 3, 7})
    ok = run_recipe(["--profile", "demo", f"data.shards={bad}", f"run.run_dir={tmp_path / 'ok'}", *FAST,
                     "run.epochs=1", "data.max_corrupt=10"])
    assert "skipped undecodable sample 000" in ok.stdout
    assert "failed to decode and were skipped: train 3" in (tmp_path / "ok" / "report.md").read_text()
    stop = run_recipe(["--profile", "demo", f"data.shards={bad}", f"run.run_dir={tmp_path / 'stop'}", *FAST,
                       "data.max_corrupt=2"], check=False)
    assert stop.returncode == 2
    err = stop.stderr.strip().splitlines()
    assert len(err) == 1 and "3 samples failed to decode, more than data.max_corrupt=2" in err[0]


@pytest.mark.parametrize("args, message", [
    (["data.shards=/nonexistent/shards"], "/nonexistent/shards: shard directory does not exist"),
    (["data.shards={empty}"], "no manifest.json here"),
    (["--profile", "demo", "data.shards={shards}", "run.precision=fp16"], "run.precision=fp16 is CUDA-only"),
    (["--profile", "demo", "data.shards={shards}", "data.labels=nope"], "no label field 'nope'"),
])
def test_bad_input_one_line(args, message, small_shards, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", shards=small_shards) for a in args]
    p = run_recipe(args + [f"run.run_dir={tmp_path / 'r'}"], check=False, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("attrdist: error: ") and message in lines[-1]
    assert "Traceback" not in p.stderr


def test_characters_multiclass_recipe_trains_and_reports(tmp_path):
    """The softmax path: image folder (with augmented copies) -> group-aware pack -> characters recipe."""
    from attrdist.demo.characters import CharactersSpec, ensure_characters
    from attrdist.pack.imagefolder import pack_imagefolder

    root = ensure_characters(tmp_path / "letters", CharactersSpec(classes=4, sources_per_class=12, copies=1, size=48))
    m = pack_imagefolder(root, tmp_path / "shards", val=0.25, test=0.0, group_by="prefix", group_sep="_",
                         group_parts=1, dataset="letters", progress=False)
    assert m["report"]["leakage"]["exact"] == 0
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "characters.py"), "--profile", "demo",
           f"data.shards={tmp_path / 'shards'}", f"run.run_dir={run_dir}", "data.batch_size=8", "data.num_workers=0",
           "run.epochs=2", "run.eval_every=1", "run.precision=fp32", "run.threads=1", "data.image_size=32"]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    assert "**Validation accuracy against `labels`:" in report and "majority baseline" in report
    assert "Confusion matrix" in report and "| A |" in report and (run_dir / "confusion.png").stat().st_size > 1000
    evals = _records(run_dir, "eval")
    assert "val/labels/accuracy:majority" in evals[0] and 0 <= evals[-1]["val/labels/accuracy"] <= 1


def test_a_run_directory_takes_one_writer_at_a_time(small_shards, tmp_path):
    """A second run (here a --resume) into a directory a live run is writing to is refused; once that
    run is SIGKILLed the kernel drops its lock and the resume goes ahead."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "coconut.py"), *demo_args(small_shards, run_dir, "run.epochs=50",
                                                                          "run.ckpt_every_steps=1")]
    first = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "checkpoints" / "last.json").is_file():
            time.sleep(0.05)
        p = run_recipe(demo_args(small_shards, run_dir, "run.epochs=1") + ["--resume"], check=False)
        assert p.returncode == 2 and "another run is writing to this directory right now" in p.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    p = run_recipe(demo_args(small_shards, run_dir, "run.epochs=1", "run.max_steps=1") + ["--resume"])
    assert "resumed from" in p.stdout


def test_the_pixel_stage_on_the_device_trains_like_the_workers(small_shards, tmp_path):
    """data.pixel_stage=device (what a GPU run gets: uint8 batches, colour/normalise/erase batched in the
    training process) against the CPU default (the same stage per sample in the workers): the same
    losses, step by step, up to float rounding."""
    losses = {}
    for where in ("workers", "device"):
        rd = tmp_path / where
        p = run_recipe(["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={rd}", *FAST,
                        "run.epochs=1", "run.eval_every=1", f"data.pixel_stage={where}"])
        assert f"(data.pixel_stage={where})" in p.stdout + p.stderr
        recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        losses[where] = [r["loss"] for r in recs if r.get("type") == "train"]
    assert len(losses["device"]) == len(losses["workers"]) > 3
    assert losses["device"] == pytest.approx(losses["workers"], rel=1e-4, abs=1e-5)


def test_bf16_batches_from_the_workers_train_exactly_like_float32_batches(small_shards, tmp_path):
    """A bf16 run on CPU gets bfloat16 images from its workers (data.worker_dtype=auto): half the bytes through
    shared memory. The model's first layer is a convolution, which bf16 autocast runs on a bf16 copy of its
    input anyway, so the losses and the evaluation are exactly those of float32 batches."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        rd = tmp_path / dtype
        p = run_recipe(["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={rd}", *FAST,
                        "run.precision=bf16", "run.epochs=1", "run.eval_every=1", f"data.worker_dtype={dtype}"])
        assert f"in the workers, {dtype} batches (data.worker_dtype={dtype})" in p.stdout + p.stderr
        recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        out[dtype] = ([r["loss"] for r in recs if r.get("type") == "train"],
                      [{k: v for k, v in r.items() if "/" in k and not k.endswith("_per_s")}  # timings differ
                       for r in recs if r.get("type") == "eval"])
    assert len(out["float32"][0]) > 3 and out["float32"][1]
    assert out["bfloat16"] == out["float32"]
