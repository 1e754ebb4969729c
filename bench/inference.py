"""Inference benchmark (issue benchmark 5): attrdist's eval/predict paths against the bare model loop.

    .venv/bin/python -m bench.inference [--rounds 5] [--quick] [--device cpu|cuda]

Two models, each built by attrdist.models.build_model from a recipe's own config:
  coconut-demo   recipes/coconut.py demo(): cross_modal ResNet-18 trunk, 64 px, 21 attributes
                 (coconut_demo_vocab.json); eval batch 64 (2 x data.batch_size); val = small demo split
  attr284-224    recipes/coco_attributes.py full(): cross_modal ResNet-50, 224 px, 2 fusion blocks,
                 head 256,128 - the experiment-2 model. No recipe ships a 284-attribute vocabulary
                 (coco_attributes' full profile takes it from the user's shards), so the shards here are
                 packed from COCO-like 640x480 JPEGs (bench.pack.make_dataset) with a synthetic 284-entry
                 vocabulary. model.pretrained='' and model.attr_init=learned, exactly what
                 attrdist.predict.load_for_inference does (weights do not change the speed); eval batch 12.

Everything runs in this process with the Trainer's own runtime (make_accelerator: device, threads,
precision as the Trainer settled it: run.precision=auto -> bf16 autocast on a CPU with AVX512-BF16 where
its probe of the model finds bf16 faster, bf16 on a GPU);
data.num_workers=0 because the eval batches come from memory. The eval images are decoded once
(the real SampleDataset, eval transform) and held in memory; then, alternating, median of rounds,
each over the same N = K x eval-batch images:
  bare               torch.inference_mode() + torch.autocast(mp) loop over the N images in eval
                     batches, on a separately built model (same config, weights copied from the
                     trainer's, channels_last model and inputs as model.channels_last says)
  measure_inference  Trainer.measure_inference(val, batches=K, warmup=1): the report's "inference
                     images/s" (the trainer's model as accelerate prepared it, no_grad + autocast,
                     one real eval batch repeated; warm-up batch not timed)
  eval               the trainer's evaluation pass on a dataset serving the same decoded samples from memory:
                     the evaluation loop as the product runs it (DataLoader collate, channels_last,
                     forward, loss, probabilities, gather) minus decoding
And end to end on JPEG files (decode included), alternating:
  predict            attrdist.predict.predict_images (what `attrdist predict` runs) with the model
                     load_for_inference loaded from a checkpoint the Trainer saved
  bare_e2e           same files: decode_image + eval_transform (same functions), batched bare loop
Once per model, for context (no target): the `attrdist predict RUN_DIR FILES...` command's wall time
(interpreter start, imports, checkpoint load and verification, decode, forward, print).
Targets (issue 5): measure_inference, eval and predict >= 0.9x the bare loop's images/s.
The experiments quoted 36.5 images/s on a GPU for the 284-attribute model.
Writes bench/results/inference.csv (inference-quick.csv with --quick).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import alternate, parser, save, summarize, target_row

ROOT = Path(__file__).resolve().parents[1]
DEMO_VOCAB = ROOT / "recipes" / "coconut_demo_vocab.json"
N_ATTR = 284
QUOTED_FPS = 36.5


def load_recipe(name: str):
    """The recipe module (recipes/<name>.py) without running it: its full() and demo() configs."""
    spec = importlib.util.spec_from_file_location(f"_bench_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def vocab_284(path: Path) -> Path:
    """A 284-attribute vocabulary; a few keywords hit bench.pack's captions so some labels are positive."""
    real = ["person", "bicycle", "street", "dog", "bench", "cat", "sofa", "food", "table", "bus", "city", "red",
            "white", "wooden", "plate"]
    attrs = [{"name": w, "keywords": [w]} for w in real]
    attrs += [{"name": f"attribute-{i:03d}", "keywords": [f"kw{i:03d}"]} for i in range(len(real), N_ATTR)]
    path.write_text(json.dumps({"name": "bench-284", "attributes": attrs}))
    return path


def demo_data(tmp: Path, n_val: int) -> tuple[Path, list[Path]]:
    """A small demo dataset (generated, packed by the COCO packer like the recipe's demo) -> (shards, val JPEGs)."""
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.demo.scenes import DemoSpec, ensure_demo
    from attrdist.pack.vocab import load_vocabulary

    root = ensure_demo(tmp / "demo", DemoSpec(seed=0, n_train=64, n_val=n_val, n_test=8), progress=False)
    ann = root / "annotations"
    out = tmp / "demo-shards"
    pack_coco_captions(out, [SplitSource(s, root / "images", ann / f"captions_{s}.json", ann / f"instances_{s}.json")
                             for s in ("train", "val", "test")], load_vocabulary(DEMO_VOCAB), dataset="bench-demo",
                       vocab_path=DEMO_VOCAB, progress=False, on_leak="warn")
    return out, sorted((root / "images" / "val").glob("*.jpg"))


def coco284_data(tmp: Path, n_val: int) -> tuple[Path, list[Path]]:
    """COCO-like 640x480 JPEGs (bench.pack.make_dataset) packed with a 284-attribute vocabulary."""
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    from bench.pack import make_dataset

    train = make_dataset(tmp / "coco-train", 12, seed=1)
    val = make_dataset(tmp / "coco-val", n_val, seed=2)
    vocab = vocab_284(tmp / "vocab284.json")
    out = tmp / "coco284-shards"
    pack_coco_captions(out, [SplitSource("train", train / "images", train / "captions.json"),
                             SplitSource("val", val / "images", val / "captions.json")],
                       load_vocabulary(vocab), dataset="bench-284", vocab_path=vocab, progress=False, on_leak="warn")
    return out, sorted((val / "images").glob("*.jpg"))


class MemoryDataset:
    """Serves already decoded eval samples (same dict layout as SampleDataset) to the evaluation pass."""

    def __init__(self, samples: list[dict], real):
        self.samples, self.real = samples, real

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index, _epoch = item
        return self.real.blank(index) if index < 0 else self.samples[index]


def eval_pass(tr, ds, n: int):
    """The trainer's evaluation pass (attrdist.train.evaluation) over the first n samples of `ds`."""
    from attrdist.core.order import BatchPlan
    from attrdist.data.samples import CorruptTally
    from attrdist.train.evaluation import evaluation_pass

    plan = BatchPlan(n, tr.data.eval_batch, tr.acc.num_processes, tr.acc.process_index, 0, 0, shuffle=False,
                     drop_last=False)
    return evaluation_pass(tr.acc, tr.model, tr.task, tr.loader(ds, plan), tr.env, CorruptTally("eval"), n)


def per_round_ratio(a: list[float], n_a: int, b: list[float], n_b: int) -> tuple[float, float, float]:
    """(median, min, max) over rounds of (n_a/a[i]) / (n_b/b[i]): images/s of A over images/s of B."""
    rs = [(n_a / x) / (n_b / y) for x, y in zip(a, b)]
    return statistics.median(rs), min(rs), max(rs)


def bench_model(key: str, label: str, cfg, recipe: str, shards: Path, files: list[Path], tmp: Path, device: str,
                rounds: int, k_batches: int) -> tuple[list[dict], list[dict], list[str]]:
    import torch

    from attrdist.core.config import apply_overrides
    from attrdist.models import build_model
    from attrdist.predict import load_for_inference, predict_images
    from attrdist.train.trainer import Trainer
    from attrdist.data.samples import batch_images
    from attrdist.core.transforms import Preprocess, decode_image, eval_transform

    from bench.train_step import reset_accelerate

    cfg = apply_overrides(cfg, [f"data.shards={shards}", f"run.out_dir={tmp / 'runs'}", "data.num_workers=0",
                                f"run.device={device}"])
    log_buf = io.StringIO()
    # a fresh accelerate state: the previous model's Trainer may have settled another precision (the CPU probe can
    # pick fp32 for the demo model and bf16 for the next), which accelerate refuses to change in one process
    reset_accelerate()
    with contextlib.redirect_stdout(log_buf):  # the Trainer's log handler binds to this buffer
        tr = Trainer(cfg, recipe)
    val = cfg.data.val_split
    names = list(tr.manifest.attributes)
    dev = tr.acc.device
    # the Trainer's own decision: run.precision=auto on a CPU with native bf16 is settled by a probe of this model
    # (attrdist.train.precision), which a busy machine can tip to fp32; the bare loop computes the same way
    mp = tr.rt.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # the same decoded eval samples for every contender
    reader, n_split = tr.eval_split(val)
    ds, b = tr.dataset(reader, train=False), tr.data.eval_batch
    n = min(n_split, k_batches * b)
    k = n // b
    n = k * b
    if k < 1:
        raise SystemExit(f"{key}: val split has {n_split} samples, fewer than one eval batch of {b}")
    samples = [ds[(i, 0)] for i in range(n)]
    mem = MemoryDataset(samples, ds)
    # the eval samples are uint8 (normalised where the batch lands): the bare loop gets them normalised up front
    batches = [batch_images({"image": torch.stack([s["image"] for s in samples[j * b:(j + 1) * b]])}, dev, fmt)
               for j in range(k)]
    # fp32 singles for the fp32 predict comparison (a bf16 run's eval samples are bfloat16: data.worker_dtype)
    singles = [batch_images({"image": s["image"].unsqueeze(0).float()}, dev) for s in samples]

    # the bare model: built from the same config, the trainer's weights copied in
    torch.manual_seed(cfg.run.seed)
    bare = build_model(cfg.model, len(names), names)
    bare.load_state_dict(tr.acc.unwrap_model(tr.model).state_dict())
    bare = bare.to(memory_format=fmt).eval().to(dev)
    autocast = (lambda: torch.autocast(device_type=dev.type, dtype=dtype)) if mp != "no" else contextlib.nullcontext

    # a checkpoint written by the Trainer, loaded the way `attrdist predict` loads it
    with contextlib.redirect_stdout(log_buf):
        tr.save(pointers=("last", "best"))
    # the device's type, as `attrdist predict --device cuda` passes it: predict_images resolves run.precision=auto
    # from it ("cuda:0" would resolve to fp32 against the bare loop's bf16)
    pmodel, pcfg, pattrs, _ckpt = load_for_inference(tr.run_dir, device=dev.type)

    def t_bare() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast():
            for x in batches:
                bare(x)
        sync()
        return time.perf_counter() - t0

    def t_measure() -> float:
        r = tr.measure_inference(val, batches=k, warmup=1)
        return r["batch"] * r["batches"] / r["images_per_s"]

    def t_eval() -> float:
        return eval_pass(tr, mem, n).seconds

    str_files = [str(p) for p in files]
    pre = Preprocess.of(tr.cfg.data)  # the Trainer's resolved preprocessing (config.json's)
    size, resize = pre.image_size, pre.eval_resize

    def t_predict() -> None:
        predict_images(pmodel, pcfg, pattrs, str_files, top=5, device=dev.type)

    def t_bare_e2e() -> None:
        xs = [eval_transform(decode_image(p.read_bytes(), int(size * resize)), pre) for p in files]
        with torch.inference_mode(), autocast():
            for j in range(0, len(xs), b):
                x = torch.stack(xs[j:j + b]).to(dev).contiguous(memory_format=fmt)
                tr.task.probs(bare(x)["logits"]).topk(min(5, len(names)), dim=1)
        sync()

    mem_fns = {"bare": t_bare, "measure_inference": t_measure, "eval": t_eval}
    e2e_fns = {"bare_e2e": t_bare_e2e, "predict": t_predict}
    for fn in (*mem_fns.values(), *e2e_fns.values()):  # warm-up: allocator, oneDNN kernels for these shapes
        fn()
    notes = []
    # same model, same images: the product's eval scores against the bare loop's
    res = eval_pass(tr, mem, n)
    with torch.inference_mode(), autocast():
        p_bare = torch.cat([tr.task.probs(bare(x)["logits"].float()) for x in batches]).cpu().numpy()
    with torch.no_grad():
        p_pred = torch.cat([tr.task.probs(pmodel(x)["logits"]) for x in singles]).cpu().numpy()
    d_eval, d_pred = float(abs(res.per_sample["scores"] - p_bare).max()), float(abs(p_pred - p_bare).max())
    notes.append(f"{key}: max |prob difference| vs bare: eval {d_eval:.2e}, predict (fp32) {d_pred:.2e}")

    t = alternate(mem_fns, rounds)
    t.update(alternate(e2e_fns, rounds))
    counts = {name: n for name in mem_fns} | {name: len(files) for name in e2e_fns}
    common = {"model": key, "device": dev.type, "precision": mp, "channels_last": cfg.model.channels_last,
              "threads": torch.get_num_threads(), "eval_batch": b, "attributes": len(names),
              "image_size": cfg.data.image_size}
    as_predict = {}  # predict_images runs the run's precision and memory format, batched (attrdist/predict.py)
    rows = [{"benchmark": "inference", "what": name, "images": counts[name], **common,
             **(as_predict if name.startswith("predict") else {}), **summarize(v, counts[name])}
            for name, v in t.items()]

    # context: the CLI as a user runs it, once
    exe = Path(sys.executable).with_name("attrdist")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "attrdist.cli"]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, "predict", str(tr.run_dir), *str_files, "--top", "5"], cwd=ROOT, capture_output=True,
                       text=True)
    cli_s = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"attrdist predict failed ({p.returncode}):\n{p.stderr[-3000:]}")
    printed = sum(1 for line in p.stdout.splitlines() if not line.startswith("#"))
    # device: the CLI's --device default, auto (cuda where there is one)
    rows.append({"benchmark": "inference", "what": "attrdist predict CLI (1 run, incl. start-up + load)",
                 "images": len(files), **common, **as_predict, "device": "auto",
                 "median_s": round(cli_s, 3), "min_s": round(cli_s, 3), "max_s": round(cli_s, 3),
                 "items_per_s": round(len(files) / cli_s, 1), "rounds": 1, "lines_printed": printed})

    targets = [
        target_row("inference", f"{label}: Trainer.measure_inference / bare loop (images/s)",
                   *per_round_ratio(t["measure_inference"], n, t["bare"], n), ">=", 0.9),
        target_row("inference", f"{label}: evaluation (the trainer's evaluation pass, batches from memory) / bare loop",
                   *per_round_ratio(t["eval"], n, t["bare"], n), ">=", 0.9),
        target_row("inference", f"{label}: predict_images (attrdist predict, incl. decode) / bare loop incl. decode",
                   *per_round_ratio(t["predict"], len(files), t["bare_e2e"], len(files)), ">=", 0.9,
                   note="decode + eval transform in this process, then batches of 64 (attrdist predict)"),
    ]
    for r in targets:
        r.update(common)
    tr.tracker.close()
    return rows, targets, notes


def measure(device: str, rounds: int, demo_k: int, full_k: int | None, tmp: Path
            ) -> tuple[list[dict], list[dict], list[str]]:
    """Both models (the 284-attribute one only if `full_k`): K eval batches each, `rounds` alternated rounds on
    `device`; (rows, targets, notes). Also what bench/gpu.py runs on a GPU."""
    os.environ["ATTRDIST_CACHE"] = str(tmp / "cache")  # nothing touches the user's cache
    coconut, coco_attr = load_recipe("coconut"), load_recipe("coco_attributes")
    t_start = time.perf_counter()
    demo_cfg = coconut.demo()
    shards, files = demo_data(tmp, n_val=demo_k * 2 * demo_cfg.data.batch_size)
    rows, targets, notes = bench_model("coconut-demo", "coconut demo (ResNet-18, 64 px, 21 attr.)", demo_cfg,
                                       "coconut", shards, files, tmp / "m1", device, rounds, demo_k)
    print(f"coconut-demo done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if full_k:
        full_cfg = coco_attr.full()
        full_cfg = replace(full_cfg, model=replace(full_cfg.model, pretrained="", attr_init="learned"))
        eval_b = full_cfg.data.eval_batch_size or 2 * full_cfg.data.batch_size
        shards, files = coco284_data(tmp, n_val=full_k * eval_b)
        r, tg, nt = bench_model("attr284-224", "284 attr. (coco_attributes full, ResNet-50, 224 px)", full_cfg,
                                "coco_attributes", shards, files, tmp / "m2", device, rounds, full_k)
        rows += r
        targets += tg
        notes += nt
    return rows, targets, notes


def main(argv=None):
    ap = parser(__doc__, rounds=5, quick="smoke run: fewer images, 1 round")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    rounds = 1 if args.quick else args.rounds
    demo_k, full_k = (2, 1) if args.quick else (4, 3)
    logging.getLogger("attrdist").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-inf-") as tmp_s:
        rows, targets, notes = measure(device, rounds, demo_k, full_k, Path(tmp_s))
    took = time.perf_counter() - t_start
    print_tables(rows, notes)
    return save("inference", rows, targets, quick=args.quick, note=f"({took:.0f} s)")


def print_tables(rows: list[dict], notes: list[str]) -> None:
    """The images/s table, the ratios, the notes and the 284-attribute model's figure against the quoted one."""
    print("| model | what | images | median | images/s |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        if "median_s" in r:
            print(f"| {r['model']} | {r['what']} | {r['images']} | {r['median_s']:.3f} s ({r['min_s']:.3f}-"
                  f"{r['max_s']:.3f}) | {r['items_per_s']:,.1f} |")
    for r in rows:
        if "spread" in r:
            print(f"{r['model']}: {r['what']}: {r['median']:.3f}x ({r['spread']})")
    for line in notes:
        print(line)
    full_bare = next((r for r in rows if r["model"] == "attr284-224" and r["what"] == "bare"), None)
    if full_bare:
        print(f"284-attribute model, bare loop: {full_bare['items_per_s']:.1f} images/s on {full_bare['device']} "
              f"({full_bare['precision']}, batch {full_bare['eval_batch']}); the experiments quoted {QUOTED_FPS} on a GPU")


if __name__ == "__main__":
    main()
