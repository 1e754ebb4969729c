"""What the first training step really got, stated from the tensors themselves: whether the host batch was
pinned (page-locked: what makes the loader's `non_blocking` copies to a GPU asynchronous), whether the
model's input and its conv weights were channels_last, and the device. The config only asks for these
(the loader pins on CUDA, model.channels_last converts the weights and the input); a layer in between that
copies or reformats a tensor undoes them silently. One line in the log after the first forward, and a
warning where what was asked is not what was observed:

    input checked: host batch pinned=True, model input channels_last=True, conv weights channels_last=True
    (20 of 20), on cuda:0

    check = InputCheck(model, pin_memory=True, channels_last=True, weights_channels_last=True)
    ... the first forward ...
    check.log_once(batch)   # after the first micro-batch; nothing afterwards
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("attrdist")


def host_tensors(obj) -> list[torch.Tensor]:
    """Every CPU tensor in a collated batch (nested in dicts, lists and tuples): what the DataLoader pins."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.device.type == "cpu" else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in host_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in host_tensors(v)]
    return []


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (NHWC strides). A tensor whose layout fits both formats (a 1x1
    conv weight, a single-channel image) counts as both."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def only_channels_last(t: torch.Tensor) -> bool:
    """Channels_last and not also the default layout: a tensor that really is NHWC."""
    return is_channels_last(t) and not t.is_contiguous()


class InputCheck:
    """Observes the first forward of `model` (a forward pre-hook, removed after it fired) and, with the host
    batch of that step, logs what the step got against what the run asked for. `pin_memory`: the loader was
    asked to pin; `channels_last`: the model input should be channels_last; `weights_channels_last`: the conv
    weights should be (model.channels_last, except under DeepSpeed, which keeps them flat)."""

    def __init__(self, model: torch.nn.Module, *, pin_memory: bool, channels_last: bool, weights_channels_last: bool,
                 observe_input: bool = True):
        """`observe_input=False` (run.compile): no hook; the line says the input was not observed. A hook on a
        compiled module is traced into its graph, and removing it after the first forward changes what the
        graph was guarded on: a second compile of the whole model."""
        self.model, self.asked = model, (pin_memory, channels_last, weights_channels_last)
        self.seen: dict | None = None
        self.done = False
        if observe_input:
            self.handle = model.register_forward_pre_hook(self._observe)
        else:
            p = next(model.parameters(), None)
            self.seen = {"input": "not observed (run.compile)", "input_cl": None, "input_only_cl": False,
                         "device": p.device if p is not None else None}

    def _observe(self, _module, args) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            self.seen = {"input": str(is_channels_last(x)), "input_cl": is_channels_last(x),
                         "input_only_cl": only_channels_last(x), "device": x.device}
        else:  # a detector takes a list of images of different sizes: no batch layout to speak of
            first = next((t for t in (x or []) if isinstance(t, torch.Tensor)), None)
            self.seen = {"input": f"n/a (a {type(x).__name__} of {len(x) if x is not None else 0} images)",
                         "input_cl": None, "input_only_cl": False, "device": first.device if first is not None else None}
        self.handle.remove()

    def weights(self) -> tuple[int, int, int]:
        """(conv weights channels_last, of them only channels_last, conv weights materialised). ZeRO-3 keeps
        parameters partitioned outside a forward: none of them is a 4-d tensor then."""
        ws = [m.weight for m in self.model.modules()
              if isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight is not None and m.weight.dim() == 4]
        return sum(map(is_channels_last, ws)), sum(map(only_channels_last, ws)), len(ws)

    def log_once(self, batch) -> str | None:
        """After the first forward (later calls do nothing): log the observed line, warn about each mismatch
        with what was asked, and return the line (None before the model's first forward)."""
        if self.done or self.seen is None:
            return None
        self.done = True
        pin_asked, cl_asked, w_asked = self.asked
        host = host_tensors(batch)
        n_pinned = sum(t.is_pinned() for t in host)
        pinned = bool(host) and n_pinned == len(host)
        cl, only_cl, n = self.weights()
        s = self.seen
        line = (f"input checked: host batch pinned={pinned}" + ("" if pinned or not n_pinned else
                                                                 f" ({n_pinned} of {len(host)} tensors)")
                + f", model input channels_last={s['input']}"
                + (f", conv weights channels_last={cl == n} ({cl} of {n})" if n else
                   ", conv weights channels_last=n/a (none materialised: partitioned)")
                + f", on {s['device']}")
        log.info("%s", line)
        if pinned != pin_asked:
            log.warning("input check: the loader was %s to pin host memory but the batch is %s", "asked" if pin_asked
                        else "not asked", "pinned" if pinned else "not pinned (host-to-device copies are synchronous)")
        if s["input_cl"] is not None and (s["input_cl"] if cl_asked else s["input_only_cl"]) != cl_asked:
            log.warning("input check: model.channels_last=%s but the model's input arrived %s", cl_asked,
                        "channels_last" if s["input_cl"] else "in the default (NCHW) layout")
        definite = n - (cl - only_cl)  # those that fit only one layout (a 1x1 conv's weight fits both)
        if n and (cl < n if w_asked else 0 < definite == only_cl):
            log.warning("input check: the conv weights were expected %s but %d of %d are channels_last",
                        "channels_last" if w_asked else "in the default layout", cl, n)
        return line
