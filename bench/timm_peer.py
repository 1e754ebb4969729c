"""attrdist's Trainer against a timm-style training loop: EfficientNet-B0, batch 32 @ 64 px, the same batches (issue 20).

    .venv/bin/python -m bench.timm_peer                 # ~6 min on 2 cores (5 rounds x 2 precisions x 3 loops)
    .venv/bin/python -m bench.timm_peer --rounds 7
    .venv/bin/python -m bench.timm_peer --quick         # smoke run: 1 round, 1 + 4 steps
    .venv/bin/python -m bench.timm_peer --only parts    # ~1 min: the per-step parts attrdist adds, timed alone

The peer is the loop of timm's train.py (train_one_epoch, 1 process, no EMA, no mixup) written out: a timm model
(`timm.create_model("efficientnet_b0", num_classes=C, drop_rate=...)`, channels_last as --channels-last does),
torch.optim.AdamW with timm's parameter groups (no weight decay on biases and norms), the SAME loss as attrdist's
task (multi-label BCE with the label mask, attrdist.tasks), and per step exactly what train.py does:
`input.to(device)` + `.contiguous(channels_last)`, `with torch.autocast("cpu", bfloat16):` around forward AND
loss (timm's amp_autocast; nullcontext in fp32), `loss.backward()`, `clip_grad_norm_` (train.py --clip-grad, here
at attrdist's optim.clip_grad_norm so both do the same work), `optimizer.step()`, `optimizer.zero_grad()`, and
`loss.item()` for the running loss meter (train.py reads it every step when not distributed). Two peers:
  timm-default  AdamW as timm's optimizer factory makes it (foreach=None: on CPU torch's per-parameter loop)
  timm-fused    the same with fused=True, i.e. the optimizer kernel attrdist uses: the ratio against THIS peer
                is attrdist's per-step overhead (its optimizer choice taken out)
attrdist: the real Trainer on model.name=classifier model.backbone=efficientnet_b0 (a timm EfficientNet-B0 +
its own classifier: the same network), the coconut demo config otherwise (run.malloc=keep, channels_last,
optim.clip_grad_norm=1, the non-finite check, the metrics record and log line of every step), run.precision pinned
to bf16 and to fp32 in turn, driven by bench/train_step.py's BenchTrainer (batches from memory, no eval/save).

Same batches: the first 4 batches of the trainer's epoch-0 plan, decoded and augmented once by attrdist's
dataset, cycled by all three loops. Rounds alternate the three loops (ABC CBA ...) in one process; the figure
is the per-step median of img/s (attrdist's logged img_per_s; the peer's own per-step clock), median over
rounds of the per-round ratio, with the min-max spread. Target: attrdist >= 1.0x in both precisions against
BOTH peers (the issue's parity; timm-fused is the one that measures attrdist's own overhead).

--only parts (also run by the full benchmark; bench/results/timm_peer-parts.csv): what attrdist adds per step,
each timed alone in this process: the metrics record (`Tracker.log` of a train record: metrics.jsonl +
TensorBoard, 5 x 500 calls), saving EfficientNet-B0's 147 BatchNorm buffers (a loop of `copy_` against
`trainer._copy`, one `torch._foreach_copy_`; 10 alternated rounds of 200 calls), and Python's garbage collector
inside `Trainer.train()` (gc.callbacks over a 3 + 40-step fp32 run: collections and ms per step). Writes bench/results/timm_peer.csv.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import parser, save, target_row


def effnet_cfg(shards: Path, precision: str):
    import bench.train_step as ts

    cfg = ts.load_recipe("coconut").demo()
    cfg = replace(cfg, model=replace(cfg.model, name="classifier", backbone="efficientnet_b0", frozen_stages=0,
                                     head_dims=()),
                  run=replace(cfg.run, precision=precision, log_every=10))
    return ts.with_data(cfg, shards, "cpu")


def timm_loop(cfg, batches, names, warmup: int, steps: int, *, fused: bool, threads: int, info: dict) -> float:
    """timm train.py's train_one_epoch body (see the module docstring); returns the median per-step seconds."""
    import timm
    import torch

    from attrdist.core import rng as rnglib
    from attrdist.tasks import make_task

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    model = timm.create_model(cfg.model.backbone, pretrained=False, num_classes=len(names), drop_rate=cfg.model.dropout)
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": cfg.optim.weight_decay}], lr=cfg.optim.lr,
                            **({"fused": True} if fused else {}))
    task, f, clip = make_task(cfg), cfg.data.labels, cfg.optim.clip_grad_norm
    amp = ((lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)) if cfg.run.precision == "bf16"
           else contextlib.nullcontext)
    model.train()
    per_step = []
    K = len(batches)
    t_prev = None
    for i in range(warmup + steps):
        if i < warmup:
            torch.manual_seed(rnglib.fold(cfg.run.seed, rnglib.DROPOUT, 0, i, 0))
        b = batches[i % K]
        x = b["image"].to("cpu").contiguous(memory_format=torch.channels_last)
        y, m, v = b[f"labels/{f}"], b[f"mask/{f}"], b["valid"]
        with amp():
            out = model(x)
            loss, _ = task.loss({"logits": out}, y, m, v, cfg.optim)
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        loss_value = loss.item()  # train.py's losses_m.update(loss.item() * accum_steps, ...)
        now = time.perf_counter()
        if i == 0:
            info.setdefault("first_loss", []).append(loss_value)
        if i >= warmup:
            per_step.append(now - t_prev)
        t_prev = now
    info.setdefault("step_s", []).append(statistics.median(per_step))
    return statistics.median(per_step)


def attrdist_steps(cfg, batches, warmup: int, steps: int, tmp: Path, info: dict) -> float:
    """The Trainer's median per-step seconds (from its logged img_per_s)."""
    import bench.train_step as ts

    ts.attrdist_inprocess(cfg, batches, warmup, steps, tmp, f"timm-peer-{cfg.run.precision}", info)
    s = cfg.data.batch_size / info["trainer_img_s"][-1]  # median of the timed steps' logged img_per_s
    info.setdefault("step_s", []).append(s)
    return s


def overhead_parts(shards: Path, tmp: Path, quick: bool) -> list[dict]:
    """The per-step parts attrdist adds to a bare loop, each timed alone (see the module docstring)."""
    import gc

    import timm
    import torch

    import bench.train_step as ts
    import attrdist.train.trainer as trainer_mod
    from attrdist.train.tracking import Tracker

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from attrdist.core.config import Config
    from attrdist.train.tracking import accelerate_log_with

    rows = []
    (tmp / "tracker").mkdir()
    # as the Trainer builds it with the default run.log_with=tensorboard: accelerate's TensorBoard tracker
    acc = Accelerator(cpu=True, log_with=accelerate_log_with(("tensorboard",), tmp / "tracker"),
                      project_dir=str(tmp / "tracker"))
    tr = Tracker(tmp / "tracker", enabled=True, acc=acc, cfg=Config(), recipe="bench")
    rec = {"type": "train", "step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-3, "bce": 0.4, "contrastive": 0.1,
           "grad_norm": 1.2, "img_per_s": 200.0, "time": 1.0}
    per = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        for i in range(500):
            rec["step"] = i
            tr.log(rec)
        per.append((time.perf_counter() - t0) / 500 * 1000)
    tr.close()
    acc.end_training()
    AcceleratorState._reset_state(True)  # the Trainers below build their own
    GradientState._reset_state()
    rows.append({"benchmark": "timm_peer", "what": f"metrics record (Tracker.log, trackers: {', '.join(tr.names) or 'none'})",
                 "ms_per_step": round(statistics.median(per), 4), "min": round(min(per), 4), "max": round(max(per), 4)})
    bufs = list(timm.create_model("efficientnet_b0", num_classes=10).buffers())
    saved = [b.detach().clone() for b in bufs]

    @torch.no_grad()
    def loop():
        for d, s in zip(saved, bufs):
            d.copy_(s)

    fns = {"loop of copy_": loop, "trainer._copy (_foreach_copy_)": lambda: trainer_mod._copy(saved, bufs)}
    res: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(4 if quick else 10):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            for _ in range(200):
                fns[k]()
            res[k].append((time.perf_counter() - t0) / 200 * 1000)
    for k, v in res.items():
        rows.append({"benchmark": "timm_peer", "what": f"BatchNorm buffer save, {len(bufs)} tensors: {k}",
                     "ms_per_step": round(statistics.median(v), 4), "min": round(min(v), 4), "max": round(max(v), 4)})
    events: list = []
    on = [False]

    def cb(phase, info):
        if on[0]:
            events.append((phase, info["generation"], time.perf_counter()))

    orig = trainer_mod.Trainer.train

    def train(self):
        on[0] = True
        try:
            return orig(self)
        finally:
            on[0] = False

    gc.callbacks.append(cb)
    trainer_mod.Trainer.train = train
    try:
        cfg = effnet_cfg(shards, "fp32")
        batches, _ = ts.standalone_batches(cfg)
        n = 3 + (5 if quick else 40)
        ts.attrdist_inprocess(cfg, batches, 3, n - 3, tmp, "gc", {})
    finally:
        gc.callbacks.remove(cb)
        trainer_mod.Trainer.train = orig
    count, ms, start = [0, 0, 0], [0.0, 0.0, 0.0], {}
    for phase, g, t in events:
        if phase == "start":
            start[g] = t
        elif g in start:
            count[g] += 1
            ms[g] += 1000 * (t - start[g])
    rows.append({"benchmark": "timm_peer", "what": f"garbage collection inside Trainer.train() ({n} steps, whole train() incl. "
                 f"set-up)", "ms_per_step": round(sum(ms) / n, 4), "gc_gen0_gen1_gen2": "/".join(map(str, count))})
    for r in rows:
        print(f"{r['what']}: {r['ms_per_step']:.4f} ms per step")
    return rows


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, rounds=5)
    ap.add_argument("--only", choices=["parts"], help="only the per-step parts (no peer comparison)")
    args = ap.parse_args(argv)
    import bench.train_step as ts
    from attrdist.malloc import tune_malloc
    from attrdist.train.runtime import available_cores

    tune_malloc("keep")  # attrdist's default run.malloc, process-wide: the peers get the same allocator
    warmup, steps = (1, 4) if args.quick else (3, 30)
    rounds = 1 if args.quick else args.rounds
    rows, targets = [], []
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-timm-peer-") as tmp:
        tmp = Path(tmp)
        shards = ts.make_shards(tmp)
        parts = overhead_parts(shards, tmp, args.quick)
        save("timm_peer-parts", parts, quick=args.quick)
        if args.only == "parts":
            return []
        for precision in ("bf16", "fp32"):
            cfg = effnet_cfg(shards, precision)
            batches, names = ts.standalone_batches(cfg)
            threads = cfg.run.threads or available_cores()
            info = {k: {} for k in ("attrdist", "timm-default", "timm-fused")}
            fns = {
                "attrdist": lambda: attrdist_steps(cfg, batches, warmup, steps, tmp, info["attrdist"]),
                "timm-default": lambda: timm_loop(cfg, batches, names, warmup, steps, fused=False, threads=threads,
                                                  info=info["timm-default"]),
                "timm-fused": lambda: timm_loop(cfg, batches, names, warmup, steps, fused=True, threads=threads,
                                                info=info["timm-fused"]),
            }
            names_ = list(fns)
            for r in range(rounds):
                for name in (names_ if r % 2 == 0 else names_[::-1]):
                    fns[name]()
            B = cfg.data.batch_size
            for name, inf in info.items():
                s = inf["step_s"]
                rows.append({"benchmark": "timm_peer", "what": f"EfficientNet-B0@64 {precision}: {name}",
                             "precision": precision, "threads": threads, "batch": B, "image_size": cfg.data.image_size,
                             "warmup_steps": warmup, "timed_steps": steps, "rounds": rounds,
                             "step_ms_median": round(1000 * statistics.median(s), 2),
                             "step_ms_min": round(1000 * min(s), 2), "step_ms_max": round(1000 * max(s), 2),
                             "img_s_median": round(B / statistics.median(s), 1),
                             "step1_loss": round(inf["first_loss"][0], 5)})
                print(f"{precision} {name}: per-step median {1000 * statistics.median(s):.1f} ms "
                      f"({B / statistics.median(s):.1f} img/s), rounds {[round(1000 * v, 1) for v in s]}")
            a = info["attrdist"]["step_s"]
            for peer in ("timm-default", "timm-fused"):
                rs = [p / x for p, x in zip(info[peer]["step_s"], a)]  # images/s ratio attrdist / peer
                note = (f"{precision}, {threads} threads, channels_last, clip 1.0; step-1 loss attrdist "
                        f"{info['attrdist']['first_loss'][0]:.5f} vs timm {info[peer]['first_loss'][0]:.5f} (same seed, same "
                        f"timm network: equal losses = the same work)")
                targets.append(target_row("timm_peer", f"EfficientNet-B0@64 b32 {precision}: attrdist / {peer} img/s "
                                          f"(per-step medians)", statistics.median(rs), min(rs), max(rs), ">=",
                                          1.0, note=note))
    return save("timm_peer", rows, targets, quick=args.quick)


if __name__ == "__main__":
    main()
