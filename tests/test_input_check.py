"""attrdist.train.input_check on CPU: the first step's line states what the tensors were (a CPU batch is never
pinned: pinning is asked on CUDA only, and needs it), and each mismatch with what the run asked for is a
warning. The same line on a GPU (pinned=True, on cuda:0) is asserted in tests/test_cuda.py; a real CPU run's
line in tests/test_train.py."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from attrdist.train.input_check import InputCheck


def convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def first_batch(pin: bool = False) -> dict:
    """A collated batch from a real DataLoader (uint8 images, labels, an error list), as the trainer gets it."""
    samples = [{"image": torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8), "label": torch.tensor(i)}
               for i in range(4)]
    loader = DataLoader(samples, batch_size=4, pin_memory=pin,
                        collate_fn=lambda s: {**torch.utils.data.default_collate(s), "errors": []})
    return next(iter(loader))


def step(model, check: InputCheck, batch: dict, channels_last: bool) -> str | None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model(batch["image"].float().contiguous(memory_format=fmt))
    return check.log_once(batch)


def test_cpu_run_as_configured_logs_the_facts_once_and_warns_about_nothing(caplog):
    model = convnet().to(memory_format=torch.channels_last)
    check = InputCheck(model, pin_memory=False, channels_last=True, weights_channels_last=True)
    assert check.log_once(first_batch()) is None  # before the first forward: nothing observed yet
    with caplog.at_level(logging.INFO, logger="attrdist"):
        line = step(model, check, first_batch(), channels_last=True)
        assert step(model, check, first_batch(), channels_last=False) is None  # once only
    assert line == ("input checked: host batch pinned=False, model input channels_last=True, conv weights "
                    "channels_last=True (2 of 2), on cpu")
    assert [r.getMessage() for r in caplog.records] == [line]
    assert not model._forward_pre_hooks  # the hook went with the first forward


def test_each_mismatch_with_what_was_asked_is_a_warning(caplog):
    model = convnet()  # weights left in the default layout
    check = InputCheck(model, pin_memory=True, channels_last=True, weights_channels_last=True)
    with caplog.at_level(logging.INFO, logger="attrdist"):
        line = step(model, check, first_batch(), channels_last=False)
    assert line == ("input checked: host batch pinned=False, model input channels_last=False, conv weights "
                    "channels_last=False (1 of 2), on cpu")  # the 1x1 conv's weight fits either layout
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "input check: the loader was asked to pin host memory but the batch is not pinned (host-to-device copies "
        "are synchronous)",
        "input check: model.channels_last=True but the model's input arrived in the default (NCHW) layout",
        "input check: the conv weights were expected channels_last but 1 of 2 are channels_last"]


def test_channels_last_where_the_default_was_asked_is_a_warning_too(caplog):
    model = convnet().to(memory_format=torch.channels_last)
    check = InputCheck(model, pin_memory=False, channels_last=False, weights_channels_last=False)
    with caplog.at_level(logging.WARNING, logger="attrdist"):
        step(model, check, first_batch(), channels_last=True)
    assert [r.getMessage() for r in caplog.records] == [
        "input check: model.channels_last=False but the model's input arrived channels_last",
        "input check: the conv weights were expected in the default layout but 2 of 2 are channels_last"]


def test_a_detector_input_list_has_no_layout_to_check(caplog):
    """torchvision detectors take a list of differently sized images: the line says so, and warns about none."""

    class ListModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, images):
            return [self.conv(x[None]) for x in images]

    model = ListModel()
    check = InputCheck(model, pin_memory=False, channels_last=True, weights_channels_last=False)
    batch = {"images": [torch.rand(3, 20, 16), torch.rand(3, 12, 18)], "index": torch.arange(2)}
    with caplog.at_level(logging.INFO, logger="attrdist"):
        model(batch["images"])
        line = check.log_once(batch)
    assert line == ("input checked: host batch pinned=False, model input channels_last=n/a (a list of 2 images), "
                    "conv weights channels_last=False (0 of 1), on cpu")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
