"""WebDataset tar shards + a manifest: writing (atomic) and indexed reading.

Layout of a packed dataset directory:

    <dir>/manifest.json            what is here (see `Manifest`), written last
    <dir>/<split>-000000.tar       WebDataset shards: <key>.jpg + <key>.json per sample

A pack is written into a staging directory beside <dir> and moved into place only when every
shard and the manifest are complete (`atomic.replace_dir`): a crashed pack never leaves a shard
or a manifest that looks complete, and never damages the previous good pack.

Sample JSON: {"id", "index" (position in its split), "crc32" ({member extension: crc32 of its bytes},
checked by the data loaders), "labels": [positive attribute indices], optional other label fields (e.g.
"true_labels") and "<field>_ignore" lists of unlabelled attribute indices, "captions"...}.
Reading (`ShardReader`) indexes each shard's tar headers once, checked (a truncated, damaged or hostile
shard is reported by name and its unreadable samples counted, never a crash), then reads by offset.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import tarfile
import threading
import time
import zlib
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


def _tarinfo_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")  # a pax header only where needed


_HEADER = _tarinfo_header("", 0)  # the fields every member shares; name, size and checksum are filled in


def member_header(name: str, size: int) -> bytes:
    """The tar header `tarfile` writes for a shard member (mode 0444, owner bigdata, mtime 0), byte for
    byte (tests/test_shards.py), built from a template: 0.006 against 0.028 ms for `TarInfo.tobuf`, which
    took ~7 % of a copy-through pack's time in the packing thread (cProfile of bench/pack.py's pack_copy).
    Names that do not fit a plain ustar header (non-ASCII, over 100 bytes) and sizes of 8 GiB or more get
    `tarfile`'s own (pax) header."""
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not raw or len(raw) > 100 or size >= 8 ** 11:
        return _tarinfo_header(name, size)
    h = bytearray(_HEADER)
    h[0:len(raw)] = raw
    h[124:136] = b"%011o\0" % size
    h[148:156] = b"%06o\0 " % (sum(h) - sum(h[148:156]) + 8 * 32)  # the checksum field counts as spaces
    return bytes(h)


class TarShardWriter:
    """One shard being written: a tar of `<key>.<ext>` members and the sha256 of its bytes as they go out
    (no second read of the shard to hash it).

    The members are what webdataset's `TarWriter` writes (mode 0444, owner bigdata), with an integer
    mtime of 0, so the same inputs give the same bytes and no member needs a pax header. Headers are
    `tarfile.TarInfo.tobuf`'s bytes (`member_header`); the archive is laid out as `tarfile` lays it out (data padded to 512-byte
    blocks, two zero blocks at the end, zeros up to a 10240-byte record), byte for byte
    (tests/test_shards.py). The packing process only builds the 512-byte headers: a writer thread hashes
    and writes the bytes (both release the GIL), so the two overlap on two cores. Its errors (a full disk)
    are raised by the next `add` or by `close`, before the shard can be taken for finished.
    webdataset's writer (a `w|` tar stream) copied every member in 10 KiB pieces with a pax header for its
    float mtime, the shard was read again to hash it, and importing webdataset imported torch (~600 MB
    of RSS in a pack). bench/pack.py measures the pack.
    """

    def __init__(self, path: Path, queue_items: int = 64):
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_items)  # bounded: memory flat in shard size
        self._thread = threading.Thread(target=self._drain, name=f"write {path.name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (parts := self._queue.get()) is not None:
            if self._error is None:  # after an error: keep taking items so that no put() blocks
                try:
                    for p in parts:
                        self._sha.update(p)
                        self._file.write(p)
                except BaseException as e:  # noqa: BLE001 - handed to the packing thread
                    self._error = e

    def _put(self, parts: list) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(parts)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def add(self, key: str, sample: dict[str, bytes]) -> None:
        parts = []
        for ext in sorted(sample):
            data = sample[ext]
            header = member_header(f"{key}.{ext}", len(data))
            pad = -len(data) % tarfile.BLOCKSIZE
            parts += [header, data, bytes(pad)] if pad else [header, data]
            self._offset += len(header) + len(data) + pad
        self._put(parts)

    def close(self) -> str:
        """Finish the archive, fsync it; returns its sha256."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self._offset + end) % tarfile.RECORDSIZE
        try:
            self._put([bytes(end)])
            self._stop()
            if self._error is not None:
                raise self._error
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()  # the caller no longer holds this writer: close the file here
            raise
        self._file.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Stop writing; the partial file is left for the caller to discard (its buffered bytes may not fit)."""
        self._stop()
        with contextlib.suppress(OSError):  # the flush of what is buffered can fail as the writes did
            self._file.close()


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

    A shard is written as `<name>.partial` and renamed when closed, so no half-written file ever carries
    a shard's name. A full disk (or any other write error) stops the pack with one line naming the file
    and what to do; the finished shards stay in the staging directory for the resume.
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
        self._open: dict[str, tuple[object, Path, int, int, dict]] = {}  # split -> (TarShardWriter, ...)
        self._skip: dict[str, int] = {}
        self.committed = False
        self.resumed_samples = 0
        self._writing = self.staging  # the file being written (for error messages)
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

    def add(self, split: str, key: str, sample: dict[str, bytes | dict], crc32: dict[str, int] | None = None) -> int:
        """Append one sample to `split`; returns its index in the split. `crc32`: the members' checksums
        where the caller already took them (a pass-2 thread, off this one); the others are taken here."""
        self._check_names(split, key, sample)
        with self._write_errors():
            return self._add(split, key, sample, crc32 or {})

    def _check_names(self, split: str, key: str, sample: dict) -> None:
        """Tar member names are <key>.<ext>: plain names only, so the shard never holds a member that an
        unpacking tool could write outside its target, and WebDataset's key/extension split (at the
        first dot) gives the key back."""
        bad = [n for n in (key, *sample) if not isinstance(n, str) or not n or "/" in n or "." in n
               or unsafe_member_name(n) or not n.isprintable()]
        if bad or "/" in split or unsafe_member_name(split):
            raise AttrdistError(f"{self.out_dir}: sample key {key!r} (split {split!r}, fields {list(sample)}) is not a "
                                f"plain name (no '/', '.', '\\', '..' or control characters); fix the ids in the "
                                f"input annotations")

    @contextlib.contextmanager
    def _write_errors(self):
        """OSError while writing (a full disk above all) -> one line naming the file and what to do."""
        try:
            yield
        except OSError as e:
            where = e.filename or self._writing
            kept = sum(len(v["shards"]) for v in self.splits.values())
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise AttrdistError(f"{where}: no space left on device while packing {self.out_dir}; free space on "
                                    f"that disk or pack to another --out, then run the same command again: the pack "
                                    f"resumes from its {kept} finished shards (a previous pack there is untouched)") from None
            raise AttrdistError(f"{where}: cannot write the pack ({e.strerror or e}); fix the cause, then run the same "
                                f"command again: the pack resumes from its {kept} finished shards") from None

    def _add(self, split: str, key: str, sample: dict[str, bytes | dict], crc32: dict[str, int]) -> int:
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
        meta["crc32"] = {k: crc32[k] if k in crc32 else zlib.crc32(v)  # checked when read
                         for k, v in sample.items() if k != "json"}
        for f in self.label_fields:
            for a in meta.get(f, []):
                counts[f][a] += 1
        record = {**{k: v for k, v in sample.items() if k != "json"}, "json": json.dumps(meta).encode()}
        writer.add(key, record)
        size = sum(len(v) for v in record.values())
        self._open[split] = (writer, path, n + 1, nbytes + size, counts)
        self._last_key = key
        if n + 1 >= self.max_samples or nbytes + size >= self.max_bytes:
            self._close_shard(split)
        return index

    def _new_shard(self, split: str):
        name = f"{split}-{len(self.splits[split]['shards']):06d}.tar"
        path = self._writing = self.staging / f"{name}.partial"  # renamed to `name` once complete
        writer = TarShardWriter(path)
        self._open[split] = (writer, path, 0, 0, {f: [0] * len(self.attributes) for f in self.label_fields})
        return self._open[split]

    def _close_shard(self, split: str) -> None:
        writer, partial, n, nbytes, counts = self._open.pop(split)
        self._writing = partial
        sha256 = writer.close()
        path = partial.with_suffix("")
        os.replace(partial, path)
        atomic.fsync_dir(self.staging)
        info = self.splits[split]
        info["shards"].append({"file": path.name, "nsamples": n, "bytes": path.stat().st_size,
                               "sha256": sha256})
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
        with self._write_errors():
            return self._commit(sources, options, report)

    def _commit(self, sources: list[dict], options: dict, report: dict | None) -> dict:
        for split in list(self._open):
            self._close_shard(split)
        splits = {k: {kk: vv for kk, vv in v.items() if kk != "last_key"} for k, v in self.splits.items()}
        manifest = {
            "format": FORMAT, "dataset": self.dataset, "attrdist_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attributes": self.attributes,
            "label_fields": self.label_fields, "splits": splits, "sources": sources,
            "options": options, "report": report or {},
        }
        self._writing = self.staging / MANIFEST
        atomic.write_json(self.staging / MANIFEST, manifest)
        (self.staging / "progress.json").unlink(missing_ok=True)  # after: a failed write above can still resume
        atomic.replace_dir(self.staging, self.out_dir)
        self.committed = True
        return manifest

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        """On failure the staging dir (finished shards + progress.json) stays for a resume."""
        for writer, *_ in self._open.values():
            try:
                writer.abort()
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
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # bad JSON or text encoding, absurd nesting
        raise AttrdistError(f"{path}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]}); re-pack the dataset") from None
    except OSError as e:
        raise AttrdistError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AttrdistError(f"{path}: format {got!r}, expected {FORMAT!r}; re-pack with this attrdist version")
    problem = _manifest_problem(data)
    if problem:
        raise AttrdistError(f"{path}: {problem}; the manifest is damaged or was not written by attrdist: re-pack the dataset")
    for split, info in data["splits"].items():
        for s in info["shards"]:
            if not (root / s["file"]).is_file():
                raise AttrdistError(f"{root / s['file']}: shard listed in {MANIFEST} is missing; re-pack or restore it")
    return Manifest(root, data)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_problem(data: dict) -> str:
    """What is wrong with the shape of a manifest ("" if nothing): everything readers index into."""
    for key in ("attributes", "label_fields"):
        if not isinstance(data.get(key), list) or not all(isinstance(a, str) for a in data[key]):
            return f"{key!r} is not a list of names"
    if not isinstance(data.get("dataset"), str):
        return "'dataset' is not a name"
    if not isinstance(data.get("splits"), dict):
        return "'splits' is not an object"
    n_attr = len(data["attributes"])
    for split, info in data["splits"].items():
        where = f"split {split!r}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list) or not _is_count(info.get("nsamples")):
            return f"{where} has no \"shards\" list and \"nsamples\" count"
        counts = info.get("label_counts")
        if not isinstance(counts, dict) or any(
                not isinstance(counts.get(f), list) or len(counts[f]) != n_attr or not all(_is_count(c) for c in counts[f])
                for f in data["label_fields"]):
            return f"{where}: \"label_counts\" does not hold {n_attr} counts per label field"
        for k, s in enumerate(info["shards"]):
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _is_count(s.get("nsamples")):
                return f"{where}: shards[{k}] has no \"file\" name and \"nsamples\" count"
            if "/" in s["file"] or unsafe_member_name(s["file"]) or s["file"] in (".", ""):
                return f"{where}: shard file {s['file']!r} is not a plain file name in the pack directory"
            if s.get("bytes") is not None and not _is_count(s["bytes"]):
                return f"{where}: shards[{k}] \"bytes\" is not a size"
        if sum(s["nsamples"] for s in info["shards"]) != info["nsamples"]:
            return f"{where}: its shards hold {sum(s['nsamples'] for s in info['shards'])} samples, not {info['nsamples']}"
    return ""


_ZERO_BLOCK = bytes(512)


class ChecksumError(ValueError):
    """A member's bytes differ from the crc32 the packer stored in the sample's json."""


def check_checksums(raw: dict, meta: dict) -> None:
    """Raise ChecksumError when a member of a read sample fails the crc32 that PackWriter stored in its json
    ("crc32": {ext: crc}): flipped bits (bit rot, a bad copy) or an edit after packing, which a JPEG decoder
    would mostly turn into wrong pixels without a word. Packs without checksums pass."""
    for ext, crc in (meta.get("crc32") or {}).items():
        if ext in raw and zlib.crc32(raw[ext]) != crc:
            raise ChecksumError(f"its {ext} bytes fail the crc32 stored when it was packed (flipped bits or an edit "
                                f"after packing); restore the shard or re-pack the dataset")


class ShardError(AttrdistError):
    """A sample that cannot be read from its shard (truncated, damaged or refused shard): the message
    names the shard file and the sample and says what to do; `.shard` (file name) and `.key` too."""

    def __init__(self, path: Path, key: str, reason: str):
        super().__init__(f"{path}: sample {key}: {reason}")
        self.shard, self.key, self.reason = path.name, key, reason


def unsafe_member_name(name: str) -> bool:
    """A tar member name that a tool unpacking the shard could write outside its target with: empty,
    absolute, with a '..' part, a backslash or a NUL (attrdist never writes such names)."""
    return (not name or name.startswith("/") or ".." in name.split("/") or "\\" in name or "\x00" in name)


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0xFF else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    """The "path" record of a POSIX extended header ("<len> path=<name>\\n" records)."""
    pos, path = 0, None
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def scan_tar(fd: int, size: int) -> tuple[list[tuple[str, int, int, bytes]], str]:
    """The members [(name, data offset, data size, type flag)] of the tar open as `fd` (`size` bytes), read
    header by header (POSIX and GNU long names applied); and why the scan stopped early ("" at a clean
    end). Never reads past a damaged header or a member cut short, so a truncated shard gives exactly
    its complete leading members."""
    members: list[tuple[str, int, int, bytes]] = []
    offset, long_name = 0, None
    while True:
        if offset == size:  # no end-of-archive marker: cut at a member boundary (missing samples are counted)
            return members, ""
        if offset + 512 > size:
            return members, f"the file ends at byte {size} inside a tar header (cut short)"
        block = os.pread(fd, 512, offset)
        if block == _ZERO_BLOCK:
            return members, ""  # end-of-archive marker
        try:
            stored = _tar_number(block[148:156])
            msize = _tar_number(block[124:136])
        except ValueError:
            stored, msize = -1, 0
        if stored != 256 + sum(block[:148]) + sum(block[156:]) or msize < 0:
            return members, f"the tar header at byte {offset} is damaged"
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        kind, data_at = block[156:157], offset + 512
        if data_at + msize > size:
            return members, f"member {name.decode('utf-8', 'replace')!r} is cut short at byte {size} (truncated file)"
        try:
            if kind in (b"x", b"L") and msize > 1 << 20:
                raise ValueError(f"a {msize}-byte long-name header")
            if kind == b"x":  # POSIX extended header: the next member's real name
                long_name = _pax_path(os.pread(fd, msize, data_at)) or long_name
            elif kind == b"L":  # GNU long name
                long_name = os.pread(fd, msize, data_at).split(b"\0", 1)[0].decode("utf-8")
            elif kind != b"g":  # b"g": a global extended header, nothing to index
                members.append((long_name or name.decode("utf-8"), data_at, msize, kind))
                long_name = None
        except (ValueError, UnicodeDecodeError) as e:
            return members, f"the tar member at byte {offset} is not usable ({e})"
        offset = data_at + (msize + 511) // 512 * 512


@dataclass(frozen=True)
class ShardIndex:
    """The samples of one shard as read from its tar headers: key -> {ext: (offset, size)}, in order;
    `problem` says why samples are missing (or, with `refused`, why none is used)."""

    samples: list[tuple[str, dict[str, tuple[int, int]]]]
    problem: str = ""
    refused: bool = False
    size: int = 0  # bytes of the shard file


def index_shard(path: Path, nsamples: int) -> ShardIndex:
    """Index one shard; a damaged or truncated shard keeps its complete leading samples, a shard with a
    member name that could escape an unpacking directory (or a link, a device...) is refused whole."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return ShardIndex([], f"cannot be opened ({e.strerror})", refused=True)
    try:
        size = os.fstat(fd).st_size
        members, problem = scan_tar(fd, size)
    except OSError as e:
        return ShardIndex([], f"cannot be read ({e.strerror})", refused=True)
    finally:
        os.close(fd)
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, msize, kind in members:
        base = name.rsplit("/", 1)[-1]
        if unsafe_member_name(name) or "." not in base[1:] or kind not in (b"0", b"\0", b"7"):
            what = "absolute, with '..' or no sample key.extension" if kind in (b"0", b"\0", b"7") else \
                f"not a regular file (tar type {kind.decode('latin-1')!r}: a link, directory or device)"
            return ShardIndex([], f"holds member {name!r}: {what}, so not written by attrdist; refusing the whole "
                                  f"shard", refused=True, size=size)
        key = name[:len(name) - len(base)] + base.split(".", 1)[0]
        ext = base.split(".", 1)[1]
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = (offset, msize)
    if len(samples) > nsamples:
        return ShardIndex([], f"holds {len(samples)} samples, {MANIFEST} lists {nsamples}: not the shard that was "
                              f"packed; refusing it", refused=True, size=size)
    if len(samples) < nsamples:
        problem = f"holds {len(samples)} of its {nsamples} samples ({problem or f'the file ends at byte {size}'})"
    return ShardIndex(samples, problem, size=size)


class ShardReader:
    """Random access to the samples of one split: `reader[i] -> {"jpg": bytes, "json": bytes, "__key__": key}`.

    Every shard is indexed when the reader is made (`index_shard`: its tar headers, checked), so a
    damaged shard is reported once, up front, naming it; DataLoader workers forked later inherit the
    index. Bytes are read with pread on a per-process file descriptor, opened on first use. A sample
    that cannot be read (its shard truncated, damaged or refused) raises `ShardError`; the data
    loader counts it as corrupt (data.max_corrupt) instead of stopping.
    """

    def __init__(self, manifest: Manifest, split: str):
        info = manifest.split(split)
        self.split, self.root = split, manifest.root
        self.paths = [str(manifest.root / s["file"]) for s in info["shards"]]
        self.lengths = np.asarray([s["nsamples"] for s in info["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.index = [index_shard(Path(p), int(n)) for p, n in zip(self.paths, self.lengths)]
        self.unreadable = 0  # samples listed in the manifest that no shard can give
        warned = 0
        for path, s, idx in zip(self.paths, info["shards"], self.index):
            lost = s["nsamples"] if idx.refused else s["nsamples"] - len(idx.samples)
            self.unreadable += lost
            changed = s.get("bytes") is not None and idx.size != s["bytes"]
            warned += bool(idx.problem or changed)
            if warned > 20 and (idx.problem or changed):
                continue  # the first 20 are named; the summary below counts the rest
            if idx.problem:
                log.warning("%s: %s; %d of its %d samples cannot be read: they are skipped and counted as corrupt "
                            "(data.max_corrupt); restore the shard or re-pack the dataset", path, idx.problem, lost,
                            s["nsamples"])
            elif changed:
                log.warning("%s: %d bytes where %s says %d: the shard changed after packing; samples that no longer "
                            "decode are skipped and counted as corrupt; restore the shard or re-pack the dataset",
                            path, idx.size, MANIFEST, s["bytes"])
        if warned > 20:
            log.warning("%s: %d shards of split %r are damaged or changed (the first 20 named above), %d samples cannot "
                        "be read; re-pack the dataset", manifest.root, warned, split, self.unreadable)
        self._fds: dict[int, int] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in that shard) of sample `index` of the split."""
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return shard, index - int(self.starts[shard])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a fresh worker process (or unpickled): descriptors of its own
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard, pos = self.locate(index)
        path, idx = Path(self.paths[shard]), self.index[shard]
        if idx.refused or pos >= len(idx.samples):
            raise ShardError(path, f"#{pos}", f"cannot be read: the shard {idx.problem}; restore it or re-pack "
                                              f"the dataset")
        key, members = idx.samples[pos]
        out: dict = {"__key__": key}
        try:
            fd = self._fd(shard)
            for ext, (offset, size) in members.items():
                out[ext] = os.pread(fd, size, offset)
                if len(out[ext]) != size:
                    raise ShardError(path, key, f"its {ext} member is cut short (the shard shrank after it was "
                                                f"opened); restore it or re-pack the dataset")
        except OSError as e:
            raise ShardError(path, key, f"cannot be read ({e.strerror}); check the file and its disk, restore "
                                        f"it or re-pack the dataset") from None
        return out

    def __del__(self):
        with contextlib.suppress(Exception):  # also half-made readers, and interpreter shutdown
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
