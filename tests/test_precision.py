"""run.precision=auto on a CPU with native bf16: a measured probe, cached per machine and model, one answer for
every rank, kept by a resumed run (attrdist/train/precision.py)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from attrdist.train import precision
from tests.conftest import FAST, run_env, run_recipe

FIELDS = dict(model={"name": "tiny", "channels_last": True, "pretrained": "x"}, classes=3, task="T", image_size=16,
              per_rank_batch=4, threads=1)


def tiny_steps():
    """A real forward + backward of a tiny conv net in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 3, 16, 16)

    def step(ctx):
        with ctx():
            loss = net(x).float().square().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)

    import contextlib

    return {"no": lambda: step(contextlib.nullcontext),
            "bf16": lambda: step(lambda: torch.autocast("cpu", dtype=torch.bfloat16))}


def test_real_probe_decides_caches_and_the_second_call_reads_the_cache(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return precision.time_alternating(tiny_steps(), rounds=3)

    fields = precision.key_fields(**FIELDS)
    first = precision.decide(fields, measure, root=tmp_path)
    assert first["source"] == "probe" and first["choice"] in ("no", "bf16") and calls == [1]
    assert len(first["fp32_ms"]) == len(first["bf16_ms"]) == 3 and all(v > 0 for v in first["fp32_ms"])
    assert first["choice"] == precision.choose(first["fp32_ms"], first["bf16_ms"])
    assert "run.precision=auto -> " in precision.describe(first) and "measured now" in precision.describe(first)
    second = precision.decide(fields, measure, root=tmp_path)
    assert calls == [1], "the second call measured again"
    assert second["source"] == "cache" and second["choice"] == first["choice"]
    assert second["fp32_ms"] == first["fp32_ms"] and "cached answer" in precision.describe(second)
    # what changes the answer changes the key: another batch, image size, thread count or model is measured anew
    for change in ({"per_rank_batch": 8}, {"image_size": 32}, {"threads": 2}, {"model": {"name": "other"}}):
        assert precision.cache_key(precision.key_fields(**{**FIELDS, **change})) != first["key"]
    assert precision.cache_key(precision.key_fields(**{**FIELDS, "model": {**FIELDS["model"], "pretrained": "y"}})) \
        == first["key"], "which weights a model starts from does not change its speed"
    # a damaged cache file is measured again, not trusted
    (tmp_path / "precision" / f"{first['key']}.json").write_text("{half")
    assert precision.decide(fields, measure, root=tmp_path)["source"] == "probe" and calls == [1, 1]


def test_choice_rule():
    assert precision.choose([1.0, 1.0, 1.0], [0.6, 0.7, 0.9]) == "bf16"  # ResNet-18 here: ~0.7x
    assert precision.choose([1.0, 1.0, 1.0], [1.6, 1.7, 1.5]) == "no"  # EfficientNet-B0 here: ~1.66x
    assert precision.choose([1.0, 1.0, 1.0], [0.97, 0.98, 0.99]) == "no"  # a tie keeps fp32
    assert precision.needs_probe("auto", "cpu", "bf16", "")
    assert not precision.needs_probe("auto", "cuda", "bf16", "")  # CUDA: bf16 where supported, unmeasured
    assert not precision.needs_probe("auto", "cpu", "no", "")  # no native bf16: fp32 by rule
    assert not precision.needs_probe("bf16", "cpu", "bf16", "") and not precision.needs_probe("auto", "cpu", "bf16", "zero2")


def test_use_fp32_turns_the_provisional_bf16_accelerator_into_fp32():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        precision.use_fp32(acc)
        model = acc.prepare(torch.nn.Linear(4, 4))
        seen = []
        model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        model(torch.randn(2, 4))
        with acc.autocast():
            inner = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(4, 4))
        assert acc.mixed_precision == "no" and seen == [torch.float32] and inner.dtype == torch.float32
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _rank(rank: int, port: int, root: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # each rank would time differently (here: opposite answers, own caches); only rank 0 decides, and broadcasts
    fake = {"no": [1.0, 1.0, 1.0], "bf16": [0.5, 0.5, 0.5] if rank == 0 else [2.0, 2.0, 2.0]}
    own = precision.decide(precision.key_fields(**FIELDS), lambda: fake, root=os.path.join(root, str(rank)))
    rec = precision.broadcast(own if rank == 0 else None, 2)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"own": own["choice"], "agreed": rec["choice"]}, f)
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_that_would_disagree_get_rank_0s_answer(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["own"] for g in got] == ["bf16", "no"] and [g["agreed"] for g in got] == ["bf16", "bf16"]


@pytest.mark.skipif(torch.cuda.is_available() or "avx512_bf16" not in precision.cpu_identity()["flags"],
                    reason="the probe runs on CPUs with native bf16 (AVX512_BF16) only")
def test_a_run_with_auto_probes_records_and_its_resume_keeps_the_answer(tmp_path, small_shards):
    """The real Trainer: run.precision=auto probes once (a line in train.log, precision.json, the report's runtime
    line); a resumed launch of the run takes precision.json without measuring; a new run on this machine with
    the same model reads the cache."""
    env = run_env(ATTRDIST_CACHE=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    base = ["--profile", "demo", f"data.shards={small_shards}", *FAST, "run.precision=auto", "run.epochs=1",
            "run.max_steps=2", "run.ckpt_every_steps=1"]
    run_recipe([*base, f"run.run_dir={run_dir}"], env=env)
    rec = json.loads((run_dir / "precision.json").read_text())
    line = next(x for x in (run_dir / "train.log").read_text().splitlines() if "run.precision=auto -> " in x)
    assert rec["source"] == "probe" and "measured now" in line
    mp = "bf16" if rec["choice"] == "bf16" else "no"
    assert f"mixed_precision={mp} " in (run_dir / "report.md").read_text()
    # attrdist predict on a CPU follows the run's measured answer (an fp32 answer turns its 'auto' into fp32)
    from attrdist.predict import load_for_inference
    _, cfg, _, _ = load_for_inference(run_dir)
    assert cfg.run.precision == ("auto" if rec["choice"] == "bf16" else "fp32")
    assert "mixed_precision=auto " in next(x for x in (run_dir / "train.log").read_text().splitlines() if "runtime: " in x)
    # a new run, same model and machine: the cache answers, nothing is measured
    run_recipe([*base, f"run.run_dir={tmp_path / 'r2'}"], env=env)
    again = json.loads((tmp_path / "r2" / "precision.json").read_text())
    assert again["source"] == "cache" and again["choice"] == rec["choice"] and again["fp32_ms"] == rec["fp32_ms"]
    # resume (one more step): the earlier launch's answer, not measured, not even read from the cache
    (tmp_path / "cache" / "precision" / f"{rec['key']}.json").unlink()
    run_recipe([*base, f"run.run_dir={run_dir}", "run.resume=auto", "run.max_steps=3"], env=env)
    lines = [x for x in (run_dir / "train.log").read_text().splitlines() if "run.precision=auto -> " in x]
    assert len(lines) == 2 and "as this run's earlier launch decided" in lines[1]
    assert not (tmp_path / "cache" / "precision" / f"{rec['key']}.json").exists()
    assert f"mixed_precision={mp} " in (run_dir / "report.md").read_text()


@pytest.mark.slow  # 39 s; the broadcast itself is covered by test_two_gloo_ranks_that_would_disagree_get_rank_0s_answer
@pytest.mark.skipif(torch.cuda.is_available() or "avx512_bf16" not in precision.cpu_identity()["flags"],
                    reason="the probe runs on CPUs with native bf16 (AVX512_BF16) only")
def test_two_real_ranks_with_auto_train_in_rank_0s_precision(tmp_path, small_shards, monkeypatch):
    """2 gloo ranks through the launcher with run.precision=auto: rank 0 probes, both ranks take its answer
    (the broadcast inside Trainer), the run finishes, and the report states the precision that was used."""
    from tests.test_distributed import args, launch

    run_dir = tmp_path / "run"
    monkeypatch.setenv("ATTRDIST_CACHE", str(tmp_path / "cache"))  # launch() passes the environment on
    launch(2, args(small_shards, run_dir, "run.precision=auto", "run.max_steps=2"))
    rec = json.loads((run_dir / "precision.json").read_text())
    assert rec["source"] == "probe" and rec["fields"]["per_rank_batch"] == 4  # batch 8 over 2 ranks
    log_text = (run_dir / "train.log").read_text()
    assert "run.precision=auto -> " in log_text and "world_size=2" in log_text
    assert f"mixed_precision={'bf16' if rec['choice'] == 'bf16' else 'no'} " in (run_dir / "report.md").read_text()
