"""Labels of foreign WebDataset shards (indexed by `attrdist index`, not packed by attrdist).

A pack written by attrdist keeps each sample's labels in its `<key>.json` as {"labels": [indices]}.
Shards written by other tools (img2dataset, a user's own `webdataset.TarWriter`) keep them elsewhere:
an integer class as text in a member such as `<key>.cls` (webdataset's convention), or a field of
their `<key>.json`. The manifest of an indexed pack says which, as "labels_from":

    {"member": "cls"}                          the member's text is one class index
    {"member": "json", "field": "label_id"}    a JSON member; the field holds an index or a list of them

`sample_meta` is the one place that turns a sample read from the shards into the json the data
loaders read (`samples.SampleDataset`, `attrdist inspect`); `sample_labels` is what `attrdist index`
checks every sample with when it writes the manifest, so what indexing counts as unusable is exactly
what training would skip.
"""

from __future__ import annotations

import json
import re

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class LabelError(ValueError):
    """A sample whose labels cannot be read from the member its manifest names (the message says why);
    `kind`: "no label member", "unreadable label" or "label out of range" (what `attrdist index` counts)."""

    def __init__(self, message: str, kind: str = "unreadable label"):
        super().__init__(message)
        self.kind = kind


def parse_labels_spec(text: str) -> dict:
    """`--labels` of `attrdist index` -> the manifest's "labels_from": "cls" (any member holding an integer
    as text) or "json:FIELD" (a field of a JSON member). ValueError with what is wrong otherwise."""
    member, sep, fld = text.partition(":")
    spec = {"member": member, "field": fld} if sep else {"member": member}
    problem = labels_from_problem(spec)
    if problem:
        raise ValueError(f"--labels {text!r}: {problem}; use cls (an integer class in <key>.cls) or "
                         f"json:FIELD (a class index or a list of them in <key>.json)")
    return spec


def labels_from_problem(spec) -> str:
    """What is wrong with a manifest's "labels_from" ("" if nothing)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("member"), str) or not _NAME.fullmatch(spec["member"]):
        return "'labels_from' does not name a sample member (such as cls or json)"
    if set(spec) - {"member", "field"}:
        return f"'labels_from' holds unknown keys {sorted(set(spec) - {'member', 'field'})}"
    if "field" in spec and (not isinstance(spec["field"], str) or not spec["field"]):
        return "'labels_from' field is not a JSON field name"
    if spec["member"].endswith("json") != ("field" in spec):
        return ("a JSON member needs a field to read the labels from (json:FIELD)" if "field" not in spec
                else f"member {spec['member']!r} is not JSON, so it has no field {spec['field']!r}")
    return ""


def _index(v, where: str, n_classes: int | None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise LabelError(f"{where} holds {json.dumps(v)[:40]}, not a class index")
    if v < 0 or (n_classes is not None and v >= n_classes):
        raise LabelError(f"{where} holds label {v}, outside the {n_classes} classes (0-{n_classes - 1}) of the manifest"
                         if n_classes is not None else f"{where} holds label {v}: class indices start at 0",
                         "label out of range")
    return v


def sample_labels(raw: dict, spec: dict, n_classes: int | None = None) -> list[int]:
    """The sorted, distinct class indices of one sample (`raw`: its members' bytes by extension) read as
    `spec` ("labels_from") says; LabelError naming the member and the problem otherwise. `n_classes`:
    indices must be below it (None: any index >= 0)."""
    member = spec["member"]
    if member not in raw:
        have = ", ".join(k for k in raw if not k.startswith("__")) or "nothing"
        raise LabelError(f"the sample has no .{member} member (its labels; it has: {have})", "no label member")
    data = raw[member]
    if "field" not in spec:
        try:
            text = bytes(data).decode("ascii").strip()
            value = int(text, 10)
        except (UnicodeDecodeError, ValueError):
            raise LabelError(f"its .{member} member {bytes(data[:20])!r} is not an integer class index") from None
        return [_index(value, f"its .{member} member", n_classes)]
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        raise LabelError(f"its .{member} member is not valid JSON") from None
    fld = spec["field"]
    if not isinstance(meta, dict) or fld not in meta:
        raise LabelError(f"its .{member} member has no field {fld!r}")
    value, where = meta[fld], f"its .{member} field {fld!r}"
    if isinstance(value, list):
        return sorted({_index(v, where, n_classes) for v in value})
    return [_index(value, where, n_classes)]


def sample_meta(raw: dict, spec: dict | None, n_classes: int) -> dict:
    """The sample json the data loaders read: the pack's own `<key>.json` for an attrdist pack (`spec`
    None), else {"labels": ...} read from the member the manifest's "labels_from" names."""
    if spec is None:
        return json.loads(raw["json"])
    return {"labels": sample_labels(raw, spec, n_classes)}
