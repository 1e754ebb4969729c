import json
import subprocess
import sys

import pytest

from attrdist.core.config import Config, apply_overrides, from_dict, help_text, to_dict, to_json
from attrdist.errors import AttrdistError
from tests.conftest import ROOT


def test_overrides_parse_by_type():
    cfg = apply_overrides(Config(), ["optim.lr=3e-4", "data.batch_size=16", "run.debug=true",
                                     "data.augment.crop_scale=0.3,0.9", "data.eval_labels=true_labels,labels",
                                     "optim.name=sgd", "data.batch_size=1e2"])
    assert cfg.optim.lr == 3e-4 and cfg.run.debug is True and cfg.optim.name == "sgd"
    assert cfg.data.batch_size == 100
    assert cfg.data.augment.crop_scale == (0.3, 0.9)
    assert cfg.data.eval_labels == ("true_labels", "labels")
    assert Config().optim.lr == 1e-4  # the original is untouched (frozen data)


@pytest.mark.parametrize("item, words", [
    ("optim.lrr=1", ["unknown config key 'optim.lrr'", "did you mean optim.lr"]),
    ("nosuchkey=1", ["unknown config key"]),
    ("data.batch_size=abc", ["data.batch_size", "expected an integer"]),
    ("optim.lr=fast", ["expected a number"]),
    ("run.debug=maybe", ["expected a boolean"]),
    ("optim.name=lion", ["must be one of"]),
    ("run.precision=fp8", ["must be one of"]),
    ("data.augment.crop_scale=0.5", ["expected 2 comma-separated values"]),
    ("optim.lr=-1", ["optim.lr must be > 0"]),
    ("data.augment.hflip=1.5", ["probability"]),
    ("model.dim=100", ["divisible"]),
    ("justtext", ["key=value"]),
    ("data.augment.crop_scale=[0.5,1.0", ["unbalanced or nested brackets", "=[0.5,1.0]"]),
    ("data.augment.crop_scale=0.5,1.0]", ["unbalanced or nested brackets"]),
    ("data.augment.crop_scale=[[0.5,1.0]]", ["unbalanced or nested brackets"]),
    ("data.augment.crop_scale=[0.5,1.0,0.7]", ["expected 2 comma-separated values"]),
])
def test_bad_overrides_give_one_line_errors(item, words):
    with pytest.raises(AttrdistError) as e:
        apply_overrides(Config(), [item])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_list_values_in_brackets_as_hydra_writes_them():
    for text in ("[0.3,0.9]", "[0.3, 0.9]", "(0.3,0.9)", "0.3,0.9"):
        assert apply_overrides(Config(), [f"data.augment.crop_scale={text}"]).data.augment.crop_scale == (0.3, 0.9)
    assert apply_overrides(Config(), ["model.head_dims=[256,128]"]).model.head_dims == (256, 128)
    assert apply_overrides(Config(), ["model.head_dims=[]"]).model.head_dims == ()


def test_json_round_trip():
    cfg = apply_overrides(Config(), ["data.augment.crop_scale=0.2,0.8", "run.name=x"])
    again = from_dict(Config, json.loads(to_json(cfg)))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_help_lists_every_field():
    text = help_text(Config())
    for key in ("data.batch_size=8", "optim.lr=0.0001", "data.augment.crop_scale=0.5,1.0", "run.precision=auto"):
        assert key in text


def test_recipe_help_and_cli_errors():
    p = subprocess.run([sys.executable, "recipes/coconut.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "optim.lr=" in p.stdout and "data.shards=" in p.stdout
    p = subprocess.run([sys.executable, "recipes/coconut.py", "optim.lrr=1"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["attrdist: error: unknown config key 'optim.lrr'; did you mean optim.lr?"]
