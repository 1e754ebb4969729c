"""run.offload (DeepSpeed ZeRO-Offload): what can be checked without a GPU. The config it builds, its refusals, and
the optimizer it needs: ZeRO-Offload refuses any but DeepSpeed's own CPU Adam. The offloaded run itself is in
tests/test_cuda.py."""

from __future__ import annotations

import copy

import pytest
import torch

from attrdist.core.config import OptimConfig, RunConfig
from attrdist.errors import AttrdistError
from attrdist.train import zero
from attrdist.train.trainer import build_optimizer


def test_offload_is_configured_for_gpus_and_adam_only():
    """run.offload: optimizer state (zero3: parameters too) to the CPU, in DeepSpeed's config; refused on a CPU
    device and for an optimizer DeepSpeed cannot step there (the run itself needs a GPU: tests/test_cuda.py)."""
    def build(stage, device="cuda", optim="adamw"):
        return zero.build(RunConfig(deepspeed=stage, offload="cpu"), OptimConfig(name=optim), global_batch=8, world=1,
                          precision="bf16", device=device)

    z2, z3 = build("zero2")["zero_optimization"], build("zero3")["zero_optimization"]
    assert z2["offload_optimizer"] == {"device": "cpu"} and "offload_param" not in z2
    assert z3["offload_optimizer"] == z3["offload_param"] == {"device": "cpu"}
    with pytest.raises(AttrdistError, match="run.offload=cpu: DeepSpeed steps offloaded optimizer state with its CPU "
                                            "Adam only; optim.name=sgd has no such kernel"):
        build("zero2", optim="sgd")
    with pytest.raises(AttrdistError, match="run.offload=cpu is for GPU runs"):
        build("zero2", device="cpu")


@pytest.mark.slow  # JIT-builds DeepSpeed's cpu_adam kernel on first use (65 s here), cached in TORCH_EXTENSIONS_DIR
@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_offload_steps_with_deepspeeds_cpu_adam_doing_torchs_maths(name):
    """ZeRO-Offload refuses any optimizer but its own CPU Adam: under run.offload the trainer builds that one, with
    the same parameter groups (no weight decay on biases and norms) and the same update as torch's AdamW / Adam."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    # no norm right after a bias: BatchNorm would make that bias's gradient ~1e-9, where Adam's g / (|g| + eps)
    # turns rounding into 1e-2 differences
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model = copy.deepcopy(ref)
    opts = [build_optimizer(cfg, ref, fused=False), build_optimizer(cfg, model, offload=True)]
    assert isinstance(opts[1], DeepSpeedCPUAdam) and not isinstance(opts[0], DeepSpeedCPUAdam)
    assert [(g["weight_decay"], len(g["params"])) for g in opts[1].param_groups] == [(0.1, 2), (0.0, 4)]
    x = torch.randn(16, 6)
    for _ in range(3):
        for m, opt in zip((ref, model), opts):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), (k, (a.float() - b.float()).abs().max())
