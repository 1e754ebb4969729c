"""`attrdist index`: a manifest for existing WebDataset shards, so attrdist trains on them without a re-pack.

    attrdist index DIR --labels cls [--split train='train-*.tar' --split val='val-*.tar'] [--classes FILE] [--out OUT]

Shards written by other tools (img2dataset / LAION style `00000.tar` holding `<key>.jpg`, `<key>.json`,
`<key>.txt`; a user's own `webdataset.TarWriter` output with `<key>.cls`) are read, never re-written.
Per shard: its tar headers are indexed as the reader indexes them (`reader.scan_tar`, `reader.index_shard`:
the same samples, the same refusals), members are grouped into samples by key, and every sample is
checked: an image member (jpg/jpeg/png/webp) and labels read from the member `--labels` names
(`data.foreign.sample_labels`: `cls` = an integer class as text, `json:FIELD` = a class index or a list of
them in the json), inside the classes (`--classes FILE`, one name a line; else class_0..class_<max>).
The manifest records each shard's samples, bytes and sha256, the label counts and "labels_from", from which
the data loaders read the labels (`data.foreign.sample_meta`, the one place that maps them).

Where the index goes: beside the shards (manifest.json and a wids descriptor `<split>.wids.json` per split)
when none of those files exists there, since a user's file is never replaced; else, or with --out, into
OUT (new, empty, or an earlier index made there), whose manifest then names the shards' folder
("shard_base", absolute) and whose descriptors give their absolute paths.

Nothing unusable is dropped silently:
- a damaged shard (cut short, a bad header, a member that could escape an unpacking folder, unreadable)
  is left out of the manifest and named with its reason;
- a sample with no image or no usable label stays in its shard (a shard's nsamples counts every sample:
  the reader and wids address samples by position) and is counted by reason in the output and in the
  manifest's report (the first ones named); training skips it as a corrupt sample, so the output says
  what data.max_corrupt must allow.

`wids_descriptor` is also what `PackWriter.commit` writes for every attrdist pack: wids' shard index
("wids-shard-index-v1", as `widsindex create` writes it), which `wids.ShardListDataset` opens.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from attrdist import __version__, atomic
from attrdist.data.foreign import LabelError, parse_labels_spec, sample_labels
from attrdist.data import remote
from attrdist.data.reader import FORMAT, MANIFEST, index_shard, scan_tar
from attrdist.errors import AttrdistError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # = data.samples.IMAGE_KEYS (not imported: that imports torch)
INDEX_FILES = re.compile(r"manifest\.json|[^/]+\.wids\.json")  # what an --out folder of `attrdist index` holds
_SPLIT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
NAMED = 20  # unusable samples named in the output
KEPT = 100  # ... and in the manifest's report


def wids_name(split: str) -> str:
    return f"{split}.wids.json"


def wids_descriptor(name: str, shards: list[dict], base: str = "") -> dict:
    """wids' shard index of one split: the shards' URLs (file names, which wids resolves against the
    descriptor's folder; with `base`, paths under that folder), samples and sizes (`shards`: the manifest's
    entries)."""
    url = (lambda f: f"{base.rstrip('/')}/{f}") if base else (lambda f: f)
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name,
            "shardlist": [{"url": url(s["file"]), "nsamples": s["nsamples"], "filesize": s["bytes"]} for s in shards]}


@dataclass
class ShardScan:
    """One foreign shard as indexed: counts, not per-sample lists (memory flat in the shard's size: a
    100M-sample dataset is indexed in one process), and what is wrong with it."""

    file: str
    damaged: str = ""  # why the whole shard is left out ("" if it is not)
    nsamples: int = 0
    bytes: int = 0
    sha256: str = ""
    counts: Counter = field(default_factory=Counter)  # class index -> usable samples holding it
    multi: bool = False  # some usable sample has several labels
    kinds: Counter = field(default_factory=Counter)  # unusable samples by reason kind
    unusable: list[tuple[str, str, str]] = field(default_factory=list)  # the first KEPT: (key, kind, reason)

    def bad(self, key: str, kind: str, reason: str) -> None:
        self.kinds[kind] += 1
        if len(self.unusable) < KEPT:
            self.unusable.append((key, kind, reason))


def _key(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return name[:len(name) - len(base)] + base.split(".", 1)[0]  # reader.index_shard's split


def scan_shard(path: Path, spec: dict, n_classes: int | None) -> ShardScan:
    """Index one foreign shard and check its samples (`spec`: the manifest's "labels_from")."""
    out = ShardScan(path.name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        out.damaged = f"cannot be opened ({e.strerror})"
        return out
    try:
        members, problem = scan_tar(fd, os.fstat(fd).st_size)
        keys = [_key(m[0]) for m in members]
        groups = sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
        idx = index_shard(path, groups)  # the reader's own grouping and refusals
        out.damaged = problem or idx.problem
        if out.damaged:
            return out
        out.nsamples, out.bytes = len(idx.samples), idx.size
        member = spec["member"]
        for key, mem in idx.samples:
            if not any(e in mem for e in IMAGE_EXTS):
                out.bad(key, "no image", f"the sample has no image member ({'/'.join(IMAGE_EXTS)}; it has: "
                                         f"{', '.join(mem)})")
                continue
            raw = dict.fromkeys(mem, b"")
            if member in mem:
                offset, size = mem[member]
                raw[member] = os.pread(fd, size, offset)
            try:
                labels = sample_labels(raw, spec, n_classes)
            except LabelError as e:
                out.bad(key, e.kind, str(e))
                continue
            out.counts.update(labels)
            out.multi |= len(labels) != 1
        out.sha256 = atomic.sha256_file(path)
    except OSError as e:
        out.damaged = f"cannot be read ({e.strerror})"
    finally:
        os.close(fd)
    return out


def parse_splits(specs: list[str]) -> dict[str, str]:
    """--split NAME=GLOB ... -> {name: glob}; all `*.tar` as "train" when none is given."""
    splits: dict[str, str] = {}
    for s in specs or ["train=*.tar"]:
        name, sep, pattern = s.partition("=")
        if not sep or not _SPLIT.fullmatch(name) or not pattern:
            raise AttrdistError(f"--split {s!r}: expected NAME=GLOB, e.g. --split train='train-*.tar' (NAME: letters, "
                                f"digits, _ or -)")
        if "/" in pattern:
            raise AttrdistError(f"--split {s!r}: the glob matches file names in DIR itself, without '/'; index each "
                                f"folder of shards with its own attrdist index --out")
        if name in splits:
            raise AttrdistError(f"--split {s!r}: split {name!r} is given twice")
        splits[name] = pattern
    return splits


def read_classes(path: str | os.PathLike) -> list[str]:
    """--classes FILE: one class name a line (blank lines skipped), in class index order."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise AttrdistError(f"{path}: cannot read the class names ({getattr(e, 'strerror', None) or e}); pass a "
                            f"UTF-8 text file with one class name a line") from None
    dup = [n for n, c in Counter(names).items() if c > 1]
    if not names or dup:
        raise AttrdistError(f"{path}: {'no class names' if not names else f'class {dup[0]!r} is named twice'}; "
                            f"give one distinct class name a line, in class index order")
    return names


def _out_dir(src: Path | None, out: Path | None, splits: dict[str, str]) -> tuple[Path, bool]:
    """(where the index goes, whether that is beside the shards); one line when it may not go there.
    `src` None: the shards are at a URL, so the index always goes into `out`."""
    names = [MANIFEST, *(wids_name(s) for s in splits)]
    if src is not None and (out is None or (out.exists() and out.resolve() == src.resolve())):
        clash = [n for n in names if (src / n).exists() or (src / n).is_symlink()]
        if clash:
            raise AttrdistError(f"{src / clash[0]}: already exists beside the shards, and attrdist index never replaces "
                                f"a file there; pass --out DIR to write the index into another folder")
        return src, True
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise AttrdistError(f"{out}: --out is {'a symbolic link' if out.is_symlink() else 'not a folder'}; pass a new "
                            f"or empty folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir()
                       if not (INDEX_FILES.fullmatch(p.name) and p.is_file() and not p.is_symlink()))
        if other:
            raise AttrdistError(f"{out}: holds {len(other)} files attrdist index did not write ({', '.join(other[:3])}); "
                                f"pass a new or empty --out folder")
        try:
            theirs = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {"shard_base": ""}
        except (OSError, ValueError):
            theirs = None
        if not isinstance(theirs, dict) or "shard_base" not in theirs:
            raise AttrdistError(f"{out / MANIFEST}: not an index written by attrdist index --out; pass a new or empty "
                                f"--out folder")
    return out, False


def index_shards(src: str | os.PathLike, *, labels: str, splits: list[str] = (), classes: str | None = None,
                 out: str | os.PathLike | None = None, dataset: str | None = None, workers: int | None = None,
                 progress: bool = False) -> tuple[dict, list[str]]:
    """Index the WebDataset shards in `src` (see the module docstring); returns (the manifest written, the
    lines to print: what was indexed, what is unusable, what was written, how to train on it). `workers`
    threads scan shards side by side (default: the cores): the work is preads and sha256 of whole shards,
    which release the GIL, so threads overlap it without a process pool's start-up and pickling.

    `src` may be a URL (https://, http://, s3://): a folder whose files are listed (s3 objects; an HTTP
    server's directory listing) or a brace pattern naming the shards (`.../data-{000000..000099}.tar`).
    Each shard is then streamed once into a temp file (beside --out, which a URL needs), scanned like a
    local one and deleted; the manifest's "shard_base" is the folder's URL, from which training reads the
    shards through the node cache, verified against the sha256 recorded here."""
    url = str(src) if remote.is_remote(str(src)) else None
    if url is None:
        src = Path(src)
        if not src.is_dir():
            raise AttrdistError(f"{src}: not a folder; pass the folder that holds the WebDataset shards (.tar)")
    elif out is None:
        raise AttrdistError(f"{url}: --out DIR is required for a URL (the index is written into a local folder; "
                            f"the shards stay on the server); pass --out DIR")
    try:
        spec = parse_labels_spec(labels)
    except ValueError as e:
        raise AttrdistError(str(e)) from None
    globs = parse_splits(list(splits))
    names = read_classes(classes) if classes else None
    out_dir, beside = _out_dir(src if url is None else None, Path(out) if out is not None else None, globs)
    if url is None:
        files = sorted(p.name for p in src.iterdir() if p.is_file())
    else:
        src, files = remote.list_files(url)  # src: the shards' folder URL from here on
    chosen: dict[str, list[str]] = {}
    for split, pattern in globs.items():
        chosen[split] = [f for f in files if fnmatch.fnmatchcase(f, pattern)]
        if not chosen[split]:
            raise AttrdistError(f"{src}{'/' if url else ''}: no file matches {pattern!r} for split {split!r}; pass --split "
                                f"{split}=GLOB matching its .tar shards there")
    seen: dict[str, str] = {}
    for split, fs in chosen.items():
        for f in fs:
            if f in seen:
                raise AttrdistError(f"{remote.join(src, f)}: matched by the globs of splits {seen[f]!r} and {split!r}; make the "
                                    f"--split globs pick each shard once")
            seen[f] = split

    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    n_classes = len(names) if names else None
    tmp = None
    if url is not None:  # downloads go beside --out (a big disk, as the index's own), else the temp dir
        parent = out_dir.parent if out_dir.parent.is_dir() else None
        tmp = tempfile.TemporaryDirectory(prefix=".attrdist-index-", dir=parent)

    def scan(f: str) -> ShardScan:
        if tmp is None:
            return scan_shard(src / f, spec, n_classes)
        part = Path(tmp.name) / f
        try:
            remote.download(remote.join(src, f), part)  # NotFound/AttrdistError: one line, the index stops
            return scan_shard(part, spec, n_classes)
        finally:
            part.unlink(missing_ok=True)

    pool = ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1))
    try:
        scans = {split: list(tqdm(pool.map(scan, fs), total=len(fs), desc=f"index {split}", unit="shard",
                                  disable=not progress))
                 for split, fs in chosen.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed download: the shards not started stay unfetched
        if tmp is not None:
            tmp.cleanup()
    found = [max(s.counts) for ss in scans.values() for s in ss if s.counts]
    if names is None:
        if not found:
            first = next((u for ss in scans.values() for s in ss for u in s.unusable), None)
            raise AttrdistError(f"{src}: no sample has usable labels in its .{spec['member']} member"
                                + (f" (first: {first[0]}: {first[2]})" if first else " (no readable shard)")
                                + "; check --labels")
        names = [f"class_{k}" for k in range(max(found) + 1)]
    manifest_splits, damaged, unusable, kinds = {}, [], [], Counter()
    one_label = not any(s.multi for ss in scans.values() for s in ss)
    for split, ss in scans.items():
        counts = [0] * len(names)
        shards = []
        for s in ss:
            if s.damaged:
                damaged.append({"split": split, "file": s.file, "reason": s.damaged})
                continue
            shards.append({"file": s.file, "nsamples": s.nsamples, "bytes": s.bytes, "sha256": s.sha256})
            for a, c in s.counts.items():
                counts[a] += c
            kinds.update(s.kinds)
            unusable += [{"split": split, "shard": s.file, "key": key, "reason": reason}
                         for key, _, reason in s.unusable[:KEPT - len(unusable)]]
        if not shards:
            raise AttrdistError(f"{src}: every shard of split {split!r} is damaged (first: {damaged[-1]['file']}: "
                                f"{damaged[-1]['reason']}); repair or re-download them, then index again")
        manifest_splits[split] = {"shards": shards, "nsamples": sum(s["nsamples"] for s in shards),
                                  "label_counts": {"labels": counts},
                                  "unusable": sum(sum(s.kinds.values()) for s in ss if not s.damaged)}
    manifest = {
        "format": FORMAT, "dataset": dataset or (src.rsplit("/", 1)[-1] if url else src.resolve().name), "attrdist_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attributes": names, "label_fields": ["labels"],
        "labels_from": spec, "splits": manifest_splits, "sources": [{"path": src if url else str(src.resolve())}],
        "options": {"labels": labels, "splits": globs, "classes": str(classes) if classes else None},
        "report": {"unusable": dict(kinds), "unusable_samples": unusable, "damaged_shards": damaged},
    }
    base = ""
    if not beside:
        manifest["shard_base"] = base = src if url else str(src.resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    if not beside:  # an earlier index here (checked by _out_dir): its descriptors of other splits would mislead
        for p in out_dir.glob("*.wids.json"):
            if p.name not in {wids_name(s) for s in manifest_splits}:
                p.unlink()
    written = []
    for split, info in manifest_splits.items():
        written.append(out_dir / wids_name(split))
        atomic.write_json(written[-1], wids_descriptor(f"{manifest['dataset']}-{split}", info["shards"], base))
    atomic.write_json(out_dir / MANIFEST, manifest)  # last: a manifest names a complete index
    return manifest, summary(src, out_dir, manifest, one_label, [out_dir / MANIFEST, *written])


def summary(src: Path | str, out_dir: Path, m: dict, one_label: bool, written: list[Path]) -> list[str]:
    names, splits = m["attributes"], m["splits"]
    lines = [f"indexed {src}: {sum(len(i['shards']) for i in splits.values())} shards, "
             f"{sum(i['nsamples'] for i in splits.values())} samples; labels from {_where(m)}; {len(names)} classes "
             f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"]
    lines += [f"  {k}: {len(i['shards'])} shards, {i['nsamples']} samples, {i['unusable']} unusable" for k, i in splits.items()]
    lines += problem_lines(m, src, out_dir / MANIFEST)
    lines.append("wrote " + ", ".join(str(p) for p in written))
    if one_label:
        lines.append(f"one label per sample: train a multiclass recipe, e.g. python recipes/characters.py "
                     f"data.shards={out_dir}")
    else:
        lines.append(f"several labels per sample: train a multilabel recipe, e.g. python recipes/coconut.py "
                     f"data.shards={out_dir}")
    return lines


def _where(m: dict) -> str:
    spec = m["labels_from"]
    return f".{spec['member']}" + (f" field {spec['field']!r}" if "field" in spec else "")


def problem_lines(m: dict, src: Path | str, manifest_path: Path) -> list[str]:
    """What an index's report holds: its unusable samples (counted by reason, the first named) and the
    damaged shards it left out (all named); for `attrdist index` and `attrdist inspect`."""
    r = m.get("report") or {}
    unusable, damaged, kinds = r.get("unusable_samples", []), r.get("damaged_shards", []), r.get("unusable", {})
    total = sum(kinds.values())
    lines = []
    if total:
        train = m["splits"].get("train", {}).get("unusable", 0)
        lines.append(f"unusable samples: {total} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); they "
                     f"stay in their shards and training skips each as a corrupt sample: set data.max_corrupt above "
                     f"{train or total} x the epochs of the run, or fix the shards and index again")
        lines += [f"  {u['key']} in {u['shard']}: {u['reason']}" for u in unusable[:NAMED]]
        if total > NAMED:
            lines.append(f"  ... and {total - NAMED} more (the first {len(unusable)} in {manifest_path}, \"report\")")
    if damaged:
        lines.append(f"damaged shards left out of the index: {len(damaged)}; repair or re-download them, then index again")
        lines += [f"  {remote.join(src, d['file'])} ({d['split']}): {d['reason']}" for d in damaged]
    return lines


def inspect_lines(m) -> list[str]:
    """`attrdist inspect` of an index (`m`: its reader.Manifest): where the shards are, labels, problems."""
    return [f"index of WebDataset shards in {m.shard_dir} (attrdist index; labels from {_where(m.data)})",
            *(problem_lines(m.data, m.shard_dir, m.root / MANIFEST) or ["unusable samples: none; damaged shards: none"])]
