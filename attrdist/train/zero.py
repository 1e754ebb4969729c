"""DeepSpeed ZeRO through accelerate: the engine config, built from the run's config.

    python -m launch local recipes/coconut.py --nproc 2 --deepspeed zero2        # CPU: gloo, torchrun
    python -m launch local recipes/coconut.py --nproc 8 --deepspeed zero3 run.offload=cpu   # 8 GPUs

The stage's template (attrdist/deepspeed_configs/zero{1,2,3}.json) is merged with the user's JSON
(run.deepspeed_config; its values win), then the values attrdist owns are filled in: micro-batch
per rank, gradient accumulation, global batch and gradient clipping always follow data.* and
optim.* (a JSON that disagrees is refused, never silently overridden), and mixed precision follows
run.precision:

- bf16 -> DeepSpeed's `torch_autocast` (bf16 autocast of Linear/Conv, fp32 weights and BatchNorm:
  the same numerics as the DDP path). DeepSpeed's own `bf16.enabled` casts the whole model, which
  breaks BatchNorm models (measured); it is refused.
- fp16 -> DeepSpeed's `fp16` section with dynamic loss scaling (CUDA only; refused on CPU upstream).
- fp32 -> neither.

Offload (GPU only): run.offload=cpu|nvme moves optimizer states (and, for zero3, parameters) off the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from importlib import resources
from pathlib import Path

from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def require_installed(stage: str) -> None:
    """DeepSpeed is an extra (requirements/deepspeed.txt): a run that asks for it without it stops here,
    at start, with the way to get it; accelerate would otherwise fail deep inside Accelerator()."""
    missing = [m for m in ("deepspeed", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise AttrdistError(f"run.deepspeed={stage} needs the DeepSpeed extra ({' and '.join(missing)} not installed): "
                            f"make setup-deepspeed, or DS_BUILD_OPS=0 pip install --no-build-isolation -r "
                            f"requirements/deepspeed.txt; or train with DDP (run.deepspeed='')")


def template(stage: str) -> dict:
    if stage not in STAGES:
        raise AttrdistError(f"run.deepspeed={stage!r}: choose zero1, zero2 or zero3")
    return json.loads(resources.files("attrdist").joinpath(f"deepspeed_configs/{stage}.json").read_text())


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(run, optim, *, global_batch: int, world: int, precision: str, device: str) -> dict:
    """The DeepSpeed config dict for `run.deepspeed` (see the module docstring). `global_batch`: samples
    per micro-step over all ranks (data.batch_size); `precision`: accelerate's value (no, bf16, fp16)."""
    require_installed(run.deepspeed)
    cfg = template(run.deepspeed)
    if run.deepspeed_config:
        path = Path(run.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise AttrdistError(f"{path}: cannot read this DeepSpeed JSON ({e}); fix run.deepspeed_config") from None
        stage = user.get("zero_optimization", {}).get("stage", STAGES[run.deepspeed])
        if stage != STAGES[run.deepspeed]:
            raise AttrdistError(f"{path}: zero_optimization.stage={stage} but run.deepspeed={run.deepspeed}; make them agree")
        if user.get("bf16", {}).get("enabled"):
            raise AttrdistError(f"{path}: bf16.enabled casts the whole model to bf16 (breaks BatchNorm); remove it and "
                                f"use run.precision=bf16 (DeepSpeed torch_autocast)")
        cfg = merge(cfg, user)
    owned = {"train_micro_batch_size_per_gpu": global_batch // world,
             "gradient_accumulation_steps": optim.grad_accum,
             "train_batch_size": global_batch * optim.grad_accum,
             "gradient_clipping": float(optim.clip_grad_norm)}
    for k, v in owned.items():
        if cfg.get(k, "auto") not in ("auto", v):
            raise AttrdistError(f"{run.deepspeed_config}: {k}={cfg[k]} disagrees with the run's config ({v}); "
                                f"remove it from the JSON (attrdist sets it from data.batch_size / optim.*)")
        cfg[k] = v
    cfg.pop("bf16", None)
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        cfg["fp16"] = merge({"enabled": True, "loss_scale": 0, "initial_scale_power": 16}, cfg.get("fp16", {}))
    if run.offload != "none":
        if device != "cuda":
            raise AttrdistError(f"run.offload={run.offload} is for GPU runs (it moves state off the GPU); on {device} "
                                f"set run.offload=none")
        if optim.name not in CPU_ADAM_MODES:
            raise AttrdistError(f"run.offload={run.offload}: DeepSpeed steps offloaded optimizer state with its CPU Adam "
                                f"only; optim.name={optim.name} has no such kernel: use optim.name=adamw or adam, or "
                                f"run.offload=none")
        target = {"device": run.offload, **({"nvme_path": run.offload_dir} if run.offload == "nvme" else {})}
        cfg["zero_optimization"]["offload_optimizer"] = target
        if run.deepspeed == "zero3":
            cfg["zero_optimization"]["offload_param"] = dict(target)
    return cfg


CPU_ADAM_MODES = {"adamw": True, "adam": False}  # optim.name -> DeepSpeedCPUAdam(adamw_mode=...)


def cpu_optimizer(groups: list[dict], optim):
    """The optimizer for run.offload=cpu|nvme: DeepSpeed's CPU Adam over the parameter groups. ZeRO-Offload
    steps the fp32 partitions on the CPU and refuses any other optimizer ('You are using ZeRO-Offload with
    a client provided optimizer', unless zero_force_ds_cpu_optimizer=false): its SIMD + OpenMP kernel is
    5-7x faster than torch's (DeepSpeed's measurement). adamw decouples the weight decay, adam adds it to
    the gradient (L2), as torch's AdamW and Adam do. The kernel is JIT-built with ninja on first use (65 s
    on this 2-core CPU machine, cached in TORCH_EXTENSIONS_DIR)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    log.info("optimizer: DeepSpeedCPUAdam (adamw_mode=%s) for run.offload", CPU_ADAM_MODES[optim.name])
    return DeepSpeedCPUAdam(groups, lr=optim.lr, adamw_mode=CPU_ADAM_MODES[optim.name])


def weights_only_load(path, map_location=None):
    """DeepSpeed's checkpoint reader, with torch.load(weights_only=True): its own loader unpickles
    arbitrary objects (weights_only=False). The partitions hold tensors, containers and three
    DeepSpeed types, allowed here by name; anything else is refused."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loads(engine) -> None:
    """Route a prepared DeepSpeedEngine's checkpoint reads through `weights_only_load`."""
    engine.checkpoint_engine.load = weights_only_load
