"""attrdist.pack.vocab: keyword matching rules, label vectors, vocabulary files and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attrdist.errors import AttrdistError
from attrdist.pack.vocab import Vocabulary, count_positives, load_vocabulary

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def vocab(**attrs: list[str]) -> Vocabulary:
    names = tuple(attrs)
    return Vocabulary(name="t", names=names, groups=("g",) * len(names),
                      keywords=tuple(tuple(k) for k in attrs.values()))


def hit(v: Vocabulary, text: str) -> list[str]:
    return v.matches(text)


def test_word_boundaries_and_case():
    v = vocab(red=["red"], cat=["cat"])
    for t in ["a red car", "Red, white", "it is RED.", "red", "(red)", "red-striped box", "a red's hue"]:
        assert hit(v, t) == ["red"], t
    for t in ["bored", "reddish", "shred", "credit", "tired", "red2"]:
        assert hit(v, t) == [], t
    assert hit(v, "concatenate cathedral") == []
    assert hit(v, "Cats and a CAT") == ["cat"]


def test_plurals():
    v = vocab(berry=["berry"], bus=["bus"], dog=["dog"], toy=["toy"], box=["box"])
    assert hit(v, "two berries") == ["berry"]
    assert hit(v, "a berry") == ["berry"]
    assert hit(v, "buses") == ["bus"]
    assert hit(v, "dogs") == ["dog"]
    assert hit(v, "toys") == ["toy"]  # vowel + y: plain "s"
    assert hit(v, "boxes") == ["box"]
    assert hit(v, "doggy berryish busy") == []


def test_multiword_phrases():
    v = vocab(hydrant=["fire hydrant"], dot=["polka dot"])
    for t in ["a fire hydrant", "Fire-Hydrant", "fire  hydrant", "fire\thydrant", "fire - hydrant",
              "two fire hydrants"]:
        assert hit(v, t) == ["hydrant"], t
    assert hit(v, "a fire near the hydrant") == []
    assert hit(v, "firehydrant") == []
    assert hit(v, "polka-dots") == ["dot"]


def test_labels_union_and_no_hit():
    v = vocab(red=["red", "crimson"], sky=["sky"], dog=["dog"])
    lab = v.labels(["A Crimson kite.", "The blue SKY!"])
    assert lab.dtype == np.uint8 and lab.tolist() == [1, 1, 0]
    assert v.labels(["nothing to see here"]).tolist() == [0, 0, 0]
    assert v.labels([]).tolist() == [0, 0, 0]
    assert v.labels("red dog").tolist() == [1, 0, 1]
    # texts are never glued together: a phrase cannot span two captions
    p = vocab(h=["fire hydrant"])
    assert p.labels(["a big fire", "hydrant"]).tolist() == [0]
    assert len(v) == 3


def test_count_positives():
    m = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1]], np.uint8)
    assert count_positives(m).tolist() == [3, 0, 3]
    with pytest.raises(ValueError):
        count_positives(np.zeros(3))


def write(tmp_path: Path, obj, name="v.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize("content, needle", [
    ("{not json", "invalid JSON"),
    ({"name": "x"}, "attributes"),
    ({"attributes": []}, "non-empty"),
    ({"attributes": [{"group": "g", "keywords": ["a"]}]}, '"name"'),
    ({"attributes": [{"name": "a", "group": "g"}]}, '"keywords"'),
    ({"attributes": [{"name": "a", "keywords": []}]}, "keywords"),
    ({"attributes": [{"name": "a", "keywords": ["  "]}]}, "keyword"),
    ({"attributes": [{"name": "a", "keywords": ["a"]}, {"name": "a", "keywords": ["b"]}]}, "duplicate"),
    ({"attributes": ["red"]}, "not an object"),
])
def test_bad_files_raise_attrdist_error_naming_the_file(tmp_path, content, needle):
    p = write(tmp_path, content)
    with pytest.raises(AttrdistError) as e:
        load_vocabulary(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(AttrdistError, match="nope.json"):
        load_vocabulary(p)


def test_load_roundtrip(tmp_path):
    p = write(tmp_path, {"name": "mine", "attributes": [
        {"name": "red", "group": "colour", "keywords": ["red", "scarlet"]},
        {"name": "hydrant", "keywords": ["fire hydrant"]}]})
    v = load_vocabulary(p)
    assert v.name == "mine" and v.names == ("red", "hydrant")
    assert v.groups == ("colour", "attribute")
    assert v.keywords == (("red", "scarlet"), ("fire hydrant",))
    assert v.labels(["Scarlet fire-hydrants"]).tolist() == [1, 1]


def test_recipe_vocabularies_load():
    full = load_vocabulary(RECIPES / "coconut_vocab.json")
    assert len(full) == 41
    assert set(full.groups) == {"object", "visual", "environment", "material", "state", "colour"}
    demo = load_vocabulary(RECIPES / "coconut_demo_vocab.json")
    assert len(demo) == 21
    # sanity on real-looking captions
    lab = dict(zip(full.names, full.labels(["A man riding a red bike down a city street.",
                                              "Two dogs sitting on the grass near trees."])))
    assert {k for k, x in lab.items() if x} >= {"person", "moving", "red", "vehicle", "urban",
                                                 "animal", "sitting", "field", "plant"}
    assert not lab["indoor"] and not lab["blue"]


def test_demo_vocab_matches_demo_attributes():
    from attrdist.demo.scenes import DEMO_ATTRIBUTES

    demo = load_vocabulary(RECIPES / "coconut_demo_vocab.json")
    assert demo.names == DEMO_ATTRIBUTES
    # each keyword hits its own attribute only
    for name, kws in zip(demo.names, demo.keywords):
        for k in kws:
            assert demo.matches(f"a {k} here") == [name], k
