"""Caption text -> weak image-level attribute labels, through an attribute vocabulary.

A vocabulary is a JSON file, one entry per attribute; the entry order is the label-vector order:

    {"name": "coconut-demo",
     "attributes": [{"name": "red", "group": "colour", "keywords": ["red", "crimson", "scarlet"]},
                    ...]}

`name` (top level) defaults to the file's stem and `group` to "attribute"; `attributes`, and each
entry's `name` and non-empty `keywords`, are required.

Matching rules (one precompiled regex per attribute):
- case-insensitive, on whole words: "red" matches "Red," and "red." but not "bored", "reddish"
  or "red_x" (letters, digits and "_" are word characters); a hyphen is a word boundary
  ("red-striped" mentions red);
- plurals: a keyword also matches with "s" or "es" appended, and a keyword ending in
  consonant + "y" also matches "ies" ("berry" -> "berries"); only the last word of a phrase is
  inflected;
- a multi-word keyword matches with any run of whitespace and/or hyphens between its words
  ("fire hydrant" matches "fire-hydrant" and "fire  hydrant").
- No negation handling: "no red car" still mentions red. Weak labels are noisy by nature.

An image's label vector is the OR over all its texts; an image whose texts hit nothing gets an
all-zero vector (never default attributes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from attrdist.errors import AttrdistError

__all__ = ["Vocabulary", "load_vocabulary", "count_positives", "keyword_pattern"]

# Texts of one image are joined with a separator no keyword pattern can cross.
_JOIN = " | "
_WORD_SPLIT = re.compile(r"[\s\-]+")
_VOWELS = set("aeiou")


def _inflect(word: str) -> str:
    """Regex for one (last) word and its plural forms."""
    if len(word) >= 2 and word[-1] == "y" and word[-2].isalpha() and word[-2] not in _VOWELS:
        return re.escape(word[:-1]) + r"(?:y|ys|ies)"
    return re.escape(word) + r"(?:e?s)?"


def keyword_pattern(keyword: str) -> str:
    """The regex source (without boundaries) that one keyword compiles to."""
    words = [w for w in _WORD_SPLIT.split(keyword.strip().lower()) if w]
    if not words:
        raise ValueError(f"empty keyword {keyword!r}")
    parts = [re.escape(w) for w in words[:-1]] + [_inflect(words[-1])]
    return r"[\s\-]+".join(parts)


def _compile(keywords: Iterable[str]) -> re.Pattern:
    """One regex for all keywords of an attribute; it is applied to lower-cased text."""
    kws = [k.strip().lower() for k in keywords]
    # Longest alternatives first so the regex engine never stops at a shorter prefix phrase.
    alts = sorted({keyword_pattern(k) for k in kws}, key=lambda s: (-len(s), s))
    # `\b` is much faster than a look-behind; it is right when every keyword starts with a
    # word character (letters, digits, underscore), as real keywords do.
    start = r"\b" if all(re.match(r"\w", k) for k in kws) else r"(?<!\w)"
    return re.compile(start + "(?:" + "|".join(alts) + r")(?!\w)")


@dataclass(frozen=True)
class Vocabulary:
    """Attribute names (label order), their groups and keywords, with one compiled regex each."""

    name: str
    names: tuple[str, ...]
    groups: tuple[str, ...]
    keywords: tuple[tuple[str, ...], ...]
    _patterns: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.groups) == len(self.keywords)):
            raise ValueError("names, groups and keywords must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("attribute names must be unique")
        object.__setattr__(self, "_patterns", tuple(_compile(k) for k in self.keywords))

    def __len__(self) -> int:
        return len(self.names)

    def labels(self, texts: Iterable[str] | str) -> np.ndarray:
        """uint8 multi-hot [A]: attribute a is 1 iff any text contains any of its keywords."""
        if isinstance(texts, str):
            texts = [texts]
        joined = _JOIN.join(texts).lower()
        out = np.zeros(len(self.names), dtype=np.uint8)
        if joined:
            for a, pat in enumerate(self._patterns):
                if pat.search(joined) is not None:
                    out[a] = 1
        return out

    def label_matrix(self, texts_per_image: Iterable[Iterable[str]]) -> np.ndarray:
        """uint8 [N, A]: `labels` for each image's texts."""
        rows = [self.labels(t) for t in texts_per_image]
        if not rows:
            return np.zeros((0, len(self.names)), dtype=np.uint8)
        return np.stack(rows)

    def matches(self, text: str) -> list[str]:
        """Names of the attributes one text mentions (label order), for debugging and reports."""
        low = text.lower()
        return [n for n, pat in zip(self.names, self._patterns) if pat.search(low) is not None]

    def index(self, name: str) -> int:
        return self.names.index(name)


def _fail(path: Path, what: str) -> AttrdistError:
    return AttrdistError(f"{path}: {what}")


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read a vocabulary JSON file; AttrdistError (naming the file and the fix) if it is bad."""
    path = Path(path)
    fmt = ('expected {"name": ..., "attributes": [{"name": ..., "group": ..., '
           '"keywords": [...]}, ...]}')
    if path.is_dir():
        raise _fail(path, "is a folder, not a vocabulary file; pass the vocabulary JSON itself (e.g. "
                          "recipes/coconut_vocab.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(path, "vocabulary file not found; pass the path of an existing vocabulary "
                          "JSON (e.g. recipes/coconut_vocab.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read vocabulary file ({' '.join(str(e).split())[:160]}); check the path and permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                          "fix the syntax") from None
    except (ValueError, RecursionError) as e:  # e.g. a number too long to convert, absurd nesting
        raise _fail(path, f"invalid JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]}); fix the file") from None
    if not isinstance(data, dict) or "attributes" not in data:
        raise _fail(path, f'missing top-level "attributes" list; {fmt}')
    entries = data["attributes"]
    if not isinstance(entries, list) or not entries:
        raise _fail(path, f'"attributes" must be a non-empty list; {fmt}')
    vname = data.get("name", path.stem)
    if not isinstance(vname, str):
        raise _fail(path, '"name" must be a string')

    names: list[str] = []
    groups: list[str] = []
    keywords: list[tuple[str, ...]] = []
    for i, entry in enumerate(entries):
        where = f"attributes[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where} is not an object; {fmt}")
        for key in ("name", "keywords"):
            if key not in entry:
                raise _fail(path, f'{where} is missing key "{key}"; {fmt}')
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise _fail(path, f'{where}: "name" must be a non-empty string')
        where = f"attributes[{i}] ({name!r})"
        if name in names:
            raise _fail(path, f"{where}: duplicate attribute name; give each attribute a unique name")
        group = entry.get("group", "attribute")
        if not isinstance(group, str) or not group.strip():
            raise _fail(path, f'{where}: "group" must be a non-empty string')
        kws = entry["keywords"]
        if not isinstance(kws, list) or not kws:
            raise _fail(path, f'{where}: "keywords" must be a non-empty list of strings; '
                              "add at least one keyword")
        for k in kws:
            if not isinstance(k, str) or not _WORD_SPLIT.sub("", k.strip()):
                raise _fail(path, f"{where}: keyword {k!r} is not a non-empty string; "
                                  "remove it or fix it")
        names.append(name)
        groups.append(group)
        keywords.append(tuple(kws))
    return Vocabulary(name=vname, names=tuple(names), groups=tuple(groups), keywords=tuple(keywords))


def count_positives(label_matrix) -> np.ndarray:
    """Per-attribute positive counts (int64 [A]) of a [N, A] multi-hot label matrix."""
    m = np.asarray(label_matrix)
    if m.ndim != 2:
        raise ValueError(f"label matrix must be 2-D [N, A], got shape {m.shape}")
    return (m > 0).sum(axis=0).astype(np.int64)
