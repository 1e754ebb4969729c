"""WebDataset tar shards + a manifest: writing (atomic) and indexed reading.

Layout of a packed dataset directory:

    <dir>/manifest.json            what is here (see `Manifest`), written last
    <dir>/<split>-000000.tar       WebDataset shards: <key>.jpg + <key>.json per sample

A pack is written into a staging directory beside <dir> and moved into place only when every
shard and the manifest are complete (`atomic.replace_dir`): a crashed pack never leaves a shard
or a manifest that looks complete, and never damages the previous good pack.

Sample JSON: {"id", "index" (position in its split), "labels": [positive attribute indices],
optional other label fields (e.g. "true_labels") and "<field>_ignore" lists of unlabelled attribute indices, "captions"...}.
Reading uses wids' indexed tar reader (random access by sample index, mmap'ed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attrdist import __version__, atomic
from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")
MANIFEST = "manifest.json"
FORMAT = "attrdist-shards-v1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_entry(path: str | os.PathLike) -> dict:
    p = Path(path)
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def _check_replaceable(out_dir: Path, dataset: str, overwrite: bool) -> None:
    """Refuse to replace a directory holding something else (another dataset, or not shards)."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise AttrdistError(f"{out_dir}: exists and is not a directory; choose another --out")
    m = out_dir / MANIFEST
    if m.is_file():
        try:
            other = json.loads(m.read_text()).get("dataset")
        except ValueError:
            other = None
        if other != dataset:
            raise AttrdistError(f"{out_dir}: already holds dataset {other!r}, not {dataset!r}; pass --overwrite "
                                f"to replace it or choose another --out")
    elif any(out_dir.iterdir()):
        raise AttrdistError(f"{out_dir}: not empty and not an attrdist pack; pass --overwrite to replace it "
                            f"or choose another --out")


class PackWriter:
    """Write splits of samples into shards in a staging dir; `commit()` publishes the pack.

        with PackWriter(out_dir, dataset="coco", attributes=names, label_fields=["labels"], job=options) as w:
            for key, sample in samples:            # deterministic order
                w.add("train", key, {"jpg": data, "json": meta})
            w.commit(sources=[...], options={...}, report={...})

    Resume: the staging directory `.<out>.staging` survives a crash with `progress.json`, which
    lists the shards that were closed (complete, fsync'ed). A new PackWriter for the same job
    (same dataset, attributes, label fields, shard size and `job` options) keeps those shards,
    discards the partial one, and `add()` skips the samples already written (checking that the
    inputs still give the same keys); `done(split)` tells a packer how many it may skip producing.
    A different job starts afresh. One packer at a time per output (a file lock).
    """

    def __init__(self, out_dir: str | os.PathLike, *, dataset: str, attributes: list[str],
                 label_fields: list[str], max_samples: int = 1000, max_bytes: int = 256 << 20,
                 overwrite: bool = False, job: dict | None = None):
        from filelock import FileLock, Timeout

        self.out_dir = Path(out_dir)
        _check_replaceable(self.out_dir, dataset, overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.out_dir.with_name(f".{self.out_dir.name}.lock")))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise AttrdistError(f"{self.out_dir}: another packer is writing this output right now") from None
        self.staging = self.out_dir.with_name(f".{self.out_dir.name}.staging")
        self.dataset, self.attributes, self.label_fields = dataset, list(attributes), list(label_fields)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.job = json.loads(json.dumps({"dataset": dataset, "attributes": self.attributes,
                                          "label_fields": self.label_fields, "max_samples": max_samples,
                                          "max_bytes": max_bytes, "job": job or {}}, default=str))
        self.splits: dict[str, dict[str, Any]] = {}
        self._open: dict[str, tuple[object, Path, int, int, dict]] = {}  # split -> (wds.TarWriter, ...)
        self._skip: dict[str, int] = {}
        self.committed = False
        self.resumed_samples = 0
        self._resume_or_reset()

    # -------------------------------------------------------------- resume
    def _resume_or_reset(self) -> None:
        import shutil

        progress = self.staging / "progress.json"
        if self.staging.is_dir() and progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except ValueError:
                state = {}
            if state.get("job") == self.job:
                self.splits = state["splits"]
                keep = {s["file"] for info in self.splits.values() for s in info["shards"]}
                for p in self.staging.iterdir():
                    if p.name not in keep and p.name != "progress.json":
                        p.unlink()
                self._skip = {k: v["nsamples"] for k, v in self.splits.items()}
                self.resumed_samples = sum(self._skip.values())
                log.info("%s: resuming an interrupted pack: %d samples in %d finished shards kept", self.out_dir,
                         self.resumed_samples, len(keep))
                return
        if self.staging.exists():
            log.info("%s: discarding the staging directory of an interrupted pack of other inputs", self.out_dir)
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    def done(self, split: str) -> int:
        """Samples of `split` already in finished shards (a resumed pack skips producing them)."""
        return self.splits.get(split, {}).get("nsamples", 0)

    def _save_progress(self) -> None:
        atomic.write_json(self.staging / "progress.json", {"job": self.job, "splits": self.splits}, indent=None)

    # -------------------------------------------------------------- writing
    def _split(self, split: str) -> dict:
        return self.splits.setdefault(split, {"shards": [], "nsamples": 0, "last_key": None,
                                              "label_counts": {f: [0] * len(self.attributes) for f in self.label_fields}})

    def add(self, split: str, key: str, sample: dict[str, bytes | dict]) -> int:
        """Append one sample to `split`; returns its index in the split."""
        info = self._split(split)
        if self._skip.get(split):  # already written by the interrupted run
            self._skip[split] -= 1
            if self._skip[split] == 0 and info["last_key"] != key:
                raise AttrdistError(f"{self.out_dir}: the inputs changed since the interrupted pack (sample "
                                    f"{key!r} where {info['last_key']!r} was written); delete {self.staging} and re-pack")
            return self._skip[split]
        writer, path, n, nbytes, counts = self._open.get(split) or self._new_shard(split)
        index = info["nsamples"] + n
        meta = dict(sample["json"])
        meta["index"] = index
        for f in self.label_fields:
            for a in meta.get(f, []):
                counts[f][a] += 1
        record = {"__key__": key, **{k: v for k, v in sample.items() if k != "json"},
                  "json": json.dumps(meta).encode()}
        writer.write(record)
        size = sum(len(v) for k, v in record.items() if k != "__key__")
        self._open[split] = (writer, path, n + 1, nbytes + size, counts)
        self._last_key = key
        if n + 1 >= self.max_samples or nbytes + size >= self.max_bytes:
            self._close_shard(split)
        return index

    def _new_shard(self, split: str):
        name = f"{split}-{len(self.splits[split]['shards']):06d}.tar"
        path = self.staging / name
        import webdataset as wds  # imports torch (~2 s, ~600 MB): only when a shard is written

        writer = wds.TarWriter(str(path), mtime=0.0)  # fixed mtime: same inputs give the same shard bytes
        self._open[split] = (writer, path, 0, 0, {f: [0] * len(self.attributes) for f in self.label_fields})
        return self._open[split]

    def _close_shard(self, split: str) -> None:
        writer, path, n, nbytes, counts = self._open.pop(split)
        writer.close()
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        info = self.splits[split]
        info["shards"].append({"file": path.name, "nsamples": n, "bytes": path.stat().st_size,
                               "sha256": sha256_file(path)})
        info["nsamples"] += n
        info["last_key"] = self._last_key
        for f in self.label_fields:
            info["label_counts"][f] = [a + b for a, b in zip(info["label_counts"][f], counts[f])]
        self._save_progress()

    def commit(self, *, sources: list[dict], options: dict, report: dict | None = None) -> dict:
        unfinished = {k: v for k, v in self._skip.items() if v}
        if unfinished:
            raise AttrdistError(f"{self.out_dir}: the inputs now give fewer samples than the interrupted pack "
                                f"wrote ({unfinished}); delete {self.staging} and re-pack")
        for split in list(self._open):
            self._close_shard(split)
        splits = {k: {kk: vv for kk, vv in v.items() if kk != "last_key"} for k, v in self.splits.items()}
        manifest = {
            "format": FORMAT, "dataset": self.dataset, "attrdist_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attributes": self.attributes,
            "label_fields": self.label_fields, "splits": splits, "sources": sources,
            "options": options, "report": report or {},
        }
        (self.staging / "progress.json").unlink(missing_ok=True)
        atomic.write_json(self.staging / MANIFEST, manifest)
        atomic.replace_dir(self.staging, self.out_dir)
        self.committed = True
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        """On failure the staging dir (finished shards + progress.json) stays for a resume."""
        for writer, *_ in self._open.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the partial shard is discarded on resume
                pass
        self._open.clear()
        self._lock.release()


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict = field(repr=False)

    @property
    def attributes(self) -> list[str]:
        return self.data["attributes"]

    @property
    def label_fields(self) -> list[str]:
        return self.data["label_fields"]

    def split(self, name: str) -> dict:
        if name not in self.data["splits"]:
            raise AttrdistError(f"{self.root / MANIFEST}: no split {name!r} (have: {', '.join(self.data['splits'])})")
        return self.data["splits"][name]

    def has_split(self, name: str) -> bool:
        return name in self.data["splits"]

    def label_prior(self, split: str, label_field: str) -> np.ndarray:
        info = self.split(split)
        return np.asarray(info["label_counts"][label_field], dtype=np.float64) / max(1, info["nsamples"])


def load_manifest(root: str | os.PathLike) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise AttrdistError(f"{root}: shard directory does not exist; pack data first (python shards/coco.py --help) or leave data.shards empty for the demo")
    if not path.is_file():
        raise AttrdistError(f"{root}: no {MANIFEST} here, so these are not complete attrdist shards; (re)pack with shards/*.py")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttrdistError(f"{path}: not valid JSON ({e}); re-pack the dataset") from None
    if data.get("format") != FORMAT:
        raise AttrdistError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; re-pack with this attrdist version")
    for split, info in data["splits"].items():
        for s in info["shards"]:
            if not (root / s["file"]).is_file():
                raise AttrdistError(f"{root / s['file']}: shard listed in {MANIFEST} is missing; re-pack or restore it")
    return Manifest(root, data)


class ShardReader:
    """Random access to the samples of one split: `reader[i] -> {"jpg": bytes, "json": bytes, ...}`.

    Shards are opened lazily (per process: safe to create before DataLoader workers fork) with
    wids' indexed, mmap'ed tar reader.
    """

    def __init__(self, manifest: Manifest, split: str):
        info = manifest.split(split)
        self.paths = [str(manifest.root / s["file"]) for s in info["shards"]]
        self.lengths = np.asarray([s["nsamples"] for s in info["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self._open: dict[int, Any] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._pid != os.getpid():  # forked into a worker: reopen there
            self._open, self._pid = {}, os.getpid()
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        if shard not in self._open:
            from wids.wids import IndexedTarSamples

            self._open[shard] = IndexedTarSamples(path=self.paths[shard], expected_size=int(self.lengths[shard]))
        raw = self._open[shard][index - int(self.starts[shard])]
        # wids gives {".jpg": BytesIO, ...}; hand out {"jpg": bytes, ...} like webdataset does
        return {k.lstrip("."): (v.getvalue() if hasattr(v, "getvalue") else v) for k, v in raw.items()}
