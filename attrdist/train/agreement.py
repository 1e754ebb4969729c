"""Each optimizer step's all-ranks agreement, and when the host reads it (run.host_sync).

After every optimizer step all ranks must agree on the loss (for the log), on whether some rank's loss or the
step's gradients were NaN/Inf (then every rank skips the step), on how many samples were skipped as
undecodable, and on whether some rank was asked to stop. These travel in one small float32 tensor
[loss, *loss parts, non-finite, corrupt, stop], summed over the ranks by one all-reduce (the step's
gradient norm, the same on every rank, rides along unreduced). What the modes change is when the host reads it:

- step: at once, before the optimizer step, and the host steps or skips. One device synchronisation per step:
  free on a CPU (its operations run synchronously), on a GPU the queue of work runs dry every step.
- lagged: the step or skip is decided on the device. torch's fused AdamW/Adam/SGD leave a step undone when
  the optimizer's `found_inf` tensor holds 1 (the kernels read it on the device: `_fused_adam(...,
  found_inf=getattr(self, "found_inf", None))` in torch/optim/adam.py; the `step` count is put back too), and
  the BatchNorm statistics saved before the step are put back with torch.where. The sums are copied to pinned
  host memory without waiting, and the host reads step N's after step N+1 has been queued (`HostSync`), then
  records step N and applies its limits and stop signal exactly as the step mode does, one step late.

    sync = HostSync(lagged=True)
    for done in sync.push(step):        # lagged: the step before this one; step mode: this one
        after_step(done)
    for done in sync.flush():           # before a checkpoint, an evaluation, the end: nothing left pending
        after_step(done)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from attrdist.errors import AttrdistError

_FIX_AUTO = "use run.host_sync=auto or step"


def blockers(run_cfg, optim_cfg, device: str, mixed_precision: str) -> list[tuple[str, str]]:
    """(reason, fix) for everything that rules the lagged mode out in this run; [] when it can run."""
    out = []
    if device not in ("cpu", "cuda"):
        out.append((f"the {device} device has no fused optimizer step that reads found_inf", _FIX_AUTO))
    if not optim_cfg.fused:
        out.append(("optim.fused=false: only torch's fused AdamW/Adam/SGD skip a step on the device (found_inf)",
                    "drop optim.fused=false, or " + _FIX_AUTO))
    if run_cfg.deepspeed:
        out.append((f"run.deepspeed={run_cfg.deepspeed}: DeepSpeed's engine steps (or skips) inside backward itself",
                    _FIX_AUTO))
    if mixed_precision == "fp16":
        out.append(("fp16: the loss scaler decides the skip (and lowers its scale) from the host",
                    "use run.precision=bf16, or " + _FIX_AUTO))
    if run_cfg.log_samples:
        out.append(("run.log_samples=true gathers every step's sample indices to the host",
                    "drop run.log_samples, or " + _FIX_AUTO))
    if run_cfg.debug:
        out.append(("run.debug=true (anomaly detection synchronises every step anyway)", _FIX_AUTO))
    return out


def resolve(run_cfg, optim_cfg, device: str, mixed_precision: str) -> tuple[str, str]:
    """run.host_sync -> ("step" or "lagged", a line saying why). auto: lagged on CUDA where nothing rules it out,
    else step; an explicit lagged that cannot be honoured stops the run with one line."""
    want, blocked = run_cfg.host_sync, blockers(run_cfg, optim_cfg, device, mixed_precision)
    if want == "step":
        return "step", "run.host_sync=step: each step's agreement is read at once (one device sync per step)"
    if want == "lagged" and blocked:
        reason, fix = blocked[0]
        raise AttrdistError(f"run.host_sync=lagged cannot be honoured: {reason}; {fix}")
    if want == "auto" and blocked:
        return "step", f"run.host_sync=auto -> step: {blocked[0][0]}"
    if want == "auto" and device != "cuda":
        return "step", (f"run.host_sync=auto -> step: on {device} every operation runs synchronously, so reading "
                        f"each step's agreement at once costs nothing")
    return "lagged", (f"run.host_sync={want} -> lagged: non-finite steps are skipped on the device and each step's "
                      f"agreement is read one step later (a stop signal or data.max_corrupt acts one step later)")


@dataclass
class Step:
    """One optimizer step as the host knows it: the record's host-side fields (type, step, epoch, lr, rate,
    time), the names of the loss parts, this rank's skipped-sample errors, and the agreement: a list once read,
    [loss, *parts, non-finite, corrupt, stop] summed over ranks + [this rank's gradient norm or None]."""

    rec: dict
    parts: tuple[str, ...]
    errors: list
    values: list | DeviceRead

    @property
    def skipped(self) -> bool:
        return bool(self.values[-4])

    @property
    def corrupt(self) -> int:
        return int(self.values[-3])

    @property
    def stop(self) -> int:
        return int(self.values[-2])

    @property
    def grad_norm(self) -> float | None:
        return self.values[-1]


class DeviceRead:
    """A small device tensor's values, copied to the host without waiting and read later. CUDA: a non-blocking
    copy into pinned memory and an event recorded after it, so the read waits for that copy only, not for the
    work queued since (a plain .tolist() synchronises the whole stream). Elsewhere the tensor is already on the
    host (CPU operations have finished when they return)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class HostSync:
    """The steps whose agreement the host has not read yet: none in step mode, at most one when lagged."""

    def __init__(self, lagged: bool):
        self.lagged = lagged
        self.pending: deque[Step] = deque()

    def push(self, step: Step) -> list[Step]:
        """Queue `step`; returns, read and in order, the steps the host acts on now: `step` itself in step mode,
        the step before it when lagged (the device is busy with `step` meanwhile)."""
        self.pending.append(step)
        return self._read(len(self.pending) - int(self.lagged))

    def flush(self) -> list[Step]:
        """Every pending step, read (waits for the device): before what needs the loop state exact."""
        return self._read(len(self.pending))

    def _read(self, n: int) -> list[Step]:
        out = []
        for _ in range(max(0, n)):
            s = self.pending.popleft()
            if isinstance(s.values, DeviceRead):
                s.values = s.values.get()
            out.append(s)
        return out


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float32 tensor on `device` without a device sync: on CUDA through pinned memory and a
    non-blocking copy (torch.tensor(..., device="cuda") copies from pageable memory with
    c10::cuda::memcpy_and_sync, which waits for the stream)."""
    return torch.tensor(values, dtype=torch.float32, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def total_norm(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The gradients' global L2 norm as a device tensor (what clipping computes; optim.clip_grad_norm=0 computes
    nothing, but a NaN/Inf gradient must still be seen)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def flags(loss: torch.Tensor, parts: dict, grad_norm: torch.Tensor, host: list[float]) -> torch.Tensor:
    """[loss, *parts, non-finite, *host] as one float32 tensor built on the loss's device, no host read:
    non-finite = 1.0 when this rank's loss or the gradient norm is NaN/Inf. The same values as the step mode's
    host-built tensor (torch.tensor of .item()s), so both modes log and decide the same."""
    dev = loss.device
    finite = torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach())
    cols = [loss.detach().float().reshape(1)]
    cols += [v.detach().float().reshape(1) if isinstance(v, torch.Tensor) else torch.full((1,), float(v), device=dev)
             for v in parts.values()]
    return torch.cat([*cols, (~finite).float().reshape(1), to_device(host, dev)])


def inner(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (which steps it)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def state_ready(optimizer) -> bool:
    """Whether every parameter about to be stepped (it has a gradient) already holds its optimizer state, so a
    step skipped through found_inf leaves the state exactly as the step mode's skip does. Before the first real
    step it does not: a fused step skipped through found_inf still creates the state, AdamW/Adam as zeros (then
    saved where the step mode saves none), SGD with momentum as torch.empty_like buffers it leaves unwritten,
    which the next step reads as momentum (torch 2.14: tests/test_host_sync.py). The trainer decides such a step
    on the host instead: one sync, in the first step of a fresh run. A dict look-up per parameter."""
    opt = inner(optimizer)
    for g in opt.param_groups:
        if isinstance(opt, torch.optim.SGD) and not g["momentum"]:
            continue  # SGD without momentum keeps no state
        if any(p.grad is not None and not opt.state.get(p) for p in g["params"]):
            return False
    return True


@torch.no_grad()
def step_unless(skip: torch.Tensor, optimizer, buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """optimizer.step(), undone on the device where `skip` (a 0-dim bool tensor there) is true: the fused kernels
    read found_inf (exactly 1.0 skips; 2.0 would not), and each buffer b becomes where(skip, saved, b) in place:
    one kernel per buffer (torch has no multi-tensor where), queued like the rest of the step."""
    opt = inner(optimizer)
    opt.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del opt.found_inf
    for b, s in zip(buffers, saved):
        torch.where(skip, s, b, out=b)
