"""run.log_with: real demo runs logging to TensorBoard, MLflow (file store) and W&B (offline), read back with
each backend's own reader and compared to metrics.jsonl; a resumed run continues the same tracker runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import FAST, assert_one_line_error, run_env, run_recipe


def tracker_env(tmp: Path) -> dict:
    (tmp / "wb").mkdir(exist_ok=True)
    # offline: W&B writes its .wandb file only; a proxy that refuses every connection catches any attempt to go out
    return run_env(MLFLOW_TRACKING_URI=f"file:{tmp / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true", WANDB_MODE="offline",
                   WANDB_DIR=str(tmp / "wb"), WANDB_SILENT="true", WANDB_DISABLE_GIT="true", HTTPS_PROXY="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: a 7-byte header, 32 KiB blocks of
    records each with crc32, length, type (1 full, 2 first, 3 middle, 4 last)), parsed by wandb's own proto."""
    from wandb.proto import wandb_internal_pb2

    data, out, pos, part = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def wandb_history(path: Path) -> tuple[dict, dict]:
    """(config key -> value, {(step, key): value}) of one offline W&B run."""
    config, history = {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history[(rec.history.step.num, k)] = v
    return config, history


@pytest.fixture(scope="module")
def tracked(small_shards, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("trackers")
    run_dir = tmp / "run"
    args = ["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={run_dir}", *FAST, "run.epochs=1",
            "run.log_with=tensorboard,mlflow,wandb"]
    run_recipe(args, env=tracker_env(tmp))
    return tmp, run_dir


def mlflow_client(tmp: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18's file store is opt-in
    return MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")


def test_every_tracker_records_what_metrics_jsonl_has(tracked, monkeypatch):
    tmp, run_dir = tracked
    train, evals = records(run_dir, "train"), records(run_dir, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and len(evals) == 1
    cfg = json.loads((run_dir / "config.json").read_text())
    ids = json.loads((run_dir / "trackers.json").read_text())

    # TensorBoard: where it always was, the same tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in ea.Scalars("train/loss")] == [(r["step"], r["loss"]) for r in train]
    assert ea.Scalars("val/labels/micro_f1@0.5")[0].value == pytest.approx(evals[0]["val/labels/micro_f1@0.5"])

    # MLflow: the file store's run, its parameters and metric histories
    client = mlflow_client(tmp, monkeypatch)
    run = client.get_run(ids["mlflow"])
    assert client.get_experiment(run.info.experiment_id).name == "coconut-demo"
    params = run.data.params
    assert params["optim.lr"] == str(cfg["optim"]["lr"]) and params["data.batch_size"] == "16"
    assert params["run.log_with"] == "tensorboard,mlflow,wandb" and params["recipe"] == "coconut"
    assert params["data.augment.crop_scale"] == ",".join(map(str, cfg["data"]["augment"]["crop_scale"]))
    hist = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [(m.step, m.value) for m in hist] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    f1 = client.get_metric_history(ids["mlflow"], "val/labels/micro_f1_at_0.5")  # '@' is not legal in MLflow
    assert [(m.step, m.value) for m in f1] == [(6, pytest.approx(evals[0]["val/labels/micro_f1@0.5"]))]
    assert run.info.status == "FINISHED"

    # W&B offline: the .wandb file, read with wandb's own record format
    files = list((tmp / "wb" / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 1
    config, history = wandb_history(files[0])
    assert config["optim.lr"] == cfg["optim"]["lr"] and config["run.epochs"] == 1
    assert [history[(r["step"], "train/loss")] for r in train] == [pytest.approx(r["loss"]) for r in train]
    assert history[(6, "val/labels/micro_f1@0.5")] == pytest.approx(evals[0]["val/labels/micro_f1@0.5"])
    assert not (run_dir / "wandb").exists()  # WANDB_DIR was set: W&B's files went there


def test_a_resumed_run_continues_the_same_tracker_runs(tracked, monkeypatch):
    tmp, run_dir = tracked
    ids = json.loads((run_dir / "trackers.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    args = ["--profile", "demo", f"data.shards={cfg['data']['shards']}", f"run.run_dir={run_dir}", *FAST, "run.epochs=2",
            "run.log_with=tensorboard,mlflow,wandb", "run.resume=auto"]
    p = run_recipe(args, env=tracker_env(tmp))
    assert "(continued)" in p.stdout and "MLflow run continued: parameters keep their first values" in p.stdout
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 13))

    client = mlflow_client(tmp, monkeypatch)
    assert len(client.search_runs([client.get_run(ids["mlflow"]).info.experiment_id])) == 1
    hist = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [(m.step, m.value) for m in hist] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert client.get_run(ids["mlflow"]).data.params["run.epochs"] == "1"  # MLflow keeps the first value
    # W&B offline: the resumed launch writes a second offline run with the same id (`wandb sync` joins them)
    files = sorted((tmp / "wb" / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    assert len(files) == 2
    _, history = wandb_history(files[1])
    assert sorted(s for s, k in history if k == "train/loss") == list(range(7, 13))


def test_unknown_or_missing_tracker_stops_the_run(small_shards, tmp_path):
    p = run_recipe(["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={tmp_path / 'r'}", *FAST,
                    "run.log_with=tensorboard,mlfow"], check=False)
    assert_one_line_error(p, "run.log_with=tensorboard,mlfow", "unknown tracker 'mlfow'", "did you mean mlflow",
                          "accepted: tensorboard, mlflow, wandb")
    assert not (tmp_path / "r").exists()

    from attrdist.errors import AttrdistError
    from attrdist.train import tracking

    assert tracking.check_trackers("none") == () and tracking.check_trackers("") == ()
    assert tracking.check_trackers("wandb, mlflow,wandb") == ("wandb", "mlflow")
    saved = tracking.PACKAGES["wandb"]
    tracking.PACKAGES["wandb"] = ("wandb_is_not_installed_here", "wandb")  # a module that really is absent
    try:
        with pytest.raises(AttrdistError, match=r"tracker 'wandb' needs the 'wandb_is_not_installed_here' package, "
                                                r"which is not installed: pip install wandb"):
            tracking.check_trackers("tensorboard,wandb")
    finally:
        tracking.PACKAGES["wandb"] = saved


def test_no_tracker_writes_no_tensorboard(small_shards, tmp_path):
    run_dir = tmp_path / "r"
    run_recipe(["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={run_dir}", *FAST, "run.max_steps=2",
                "run.epochs=1", "run.log_with=none"])
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "trackers.json").exists()
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2] and (run_dir / "curves.png").is_file()
