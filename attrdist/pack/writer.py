"""Writing a pack: tar shards (a writer thread per shard, sha256 on the fly) and the manifest, in a
staging directory published whole (`PackWriter.commit`), resumable after a crash.

Two ways to fill a pack: `PackWriter.add` appends samples one by one in this process; or whole shards are
written elsewhere (`write_shard`, in the packers' worker processes: `attrdist.pack.pipeline.write_shards`)
and recorded in order (`PackWriter.record_shard`), each with a `.record` file beside it in the staging
folder, so that an interrupted pack can reuse a finished shard when its plan and sha256 still match
(`PackWriter.take_finished`).

The layout and the sample JSON are described in `attrdist.data.reader`, which reads them. Beside the
manifest, each split gets a wids descriptor `<split>.wids.json` (`attrdist.pack.index.wids_descriptor`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import re
import tarfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from attrdist import __version__, atomic
from attrdist.atomic import sha256_file
from attrdist.data.reader import FORMAT, MANIFEST, unsafe_member_name
from attrdist.errors import AttrdistError
from attrdist.pack.index import wids_descriptor, wids_name

log = logging.getLogger("attrdist")


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


# What a pack directory and its staging directory may hold: nothing else is ever deleted or replaced.
PUBLISHED_FILES = re.compile(r"(manifest\.json|drops\.jsonl|coco_[^/]+\.json|[^/]+\.wids\.json|[^/]+-\d{6}\.tar)")
STAGING_FILES = re.compile(PUBLISHED_FILES.pattern[:-1] + r"|progress\.json"
                           r"|[^/]+-\d{6}\.tar\.(partial|record|record\.partial)"  # + whole shards' resume records
                           r"|\.[^/]+\.tmp-\d+)")  # + atomic temp files


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside it (both resolved)."""
    return a == b or b in a.parents


def _foreign(directory: Path, allowed: re.Pattern) -> list[str]:
    """Entries of `directory` that no pack writes (sub-folders included), sorted."""
    return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in directory.iterdir()
                  if not (allowed.fullmatch(p.name) and p.is_file() and not p.is_symlink()))


def read_pack_manifest(out_dir: Path) -> dict | None:
    """The manifest of the attrdist pack in `out_dir`, or None when it holds none (or an unreadable one)."""
    try:
        m = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def check_out_dir(out_dir: str | os.PathLike, *, inputs=(), overwrite: bool = False,
                  identity: dict | None = None) -> None:
    """Refuse (one line: what was found, what to do) any --out whose replacement could lose data.

    - --out may not be, hold, or lie inside any input path (`inputs`), with or without --overwrite.
    - A missing or empty --out is packed into.
    - An attrdist pack (a manifest.json of this format, and only the files a pack writes) is replaced with
      --overwrite, or without it when its `identity` (`PackWriter.identity`: dataset, options, and when known
      the digest of every input image) is this pack's: a resume or re-run of the same inputs and options.
      Only the keys of `identity` given are compared, so a caller can check the options before reading images.
    - Anything else (a file, a symlink, a non-empty folder that is not a pack, a pack holding other files) is
      never replaced, --overwrite or not.
    """
    out = Path(out_dir)
    real = out.resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if _inside(real, rp) or _inside(rp, real):
            what = "is" if real == rp else ("lies inside" if _inside(real, rp) else "holds")
            raise AttrdistError(f"{out}: --out {what} the input {p}; pack to a folder that neither holds nor lies "
                                f"inside any input")
    if out.is_symlink():
        raise AttrdistError(f"{out}: --out is a symbolic link (to {os.readlink(out)}); pass the folder itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise AttrdistError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    m = read_pack_manifest(out)
    if m is None:
        raise AttrdistError(f"{out}: not empty and not an attrdist pack (no {MANIFEST} of format {FORMAT}); attrdist "
                            f"replaces only its own packs or an empty folder: choose another --out, or move its "
                            f"contents away yourself")
    if "labels_from" in m:  # `attrdist index` wrote it beside shards of another tool: never replace those
        raise AttrdistError(f"{out}: holds an index of WebDataset shards that attrdist did not write (attrdist index); "
                            f"attrdist never replaces them: choose another --out")
    foreign = _foreign(out, PUBLISHED_FILES)
    if foreign:
        raise AttrdistError(f"{out}: this pack folder also holds {len(foreign)} files attrdist did not write "
                            f"({', '.join(foreign[:3])}); move them out of it, or choose another --out")
    if overwrite:
        return
    theirs = m.get("identity") or {}
    if identity is not None and all(theirs.get(k) == v for k, v in identity.items()):
        return
    dataset = identity.get("dataset") if identity else None
    why = (f"dataset {m.get('dataset')!r}, not {dataset!r}" if dataset is not None and m.get("dataset") != dataset
           else "made by an older attrdist, without an identity" if not theirs
           else "packed from other options" if identity and theirs.get("options") != identity.get("options")
           else "packed from other input files")
    raise AttrdistError(f"{out}: already holds a pack of other data ({why}); pass --overwrite to replace it, or "
                        f"choose another --out")


class PackLock:
    """`.<out>.lock` beside the output, flock'ed while a packer writes it, and removed when it is done.

    filelock leaves its 0-byte file behind by design (removing it is unsafe when another process may have
    opened it in the meantime). Here the holder checks after locking that the path still names the file it
    locked, and tries again when it does not, which makes removing it on release safe. A crash leaves the
    file; the next packer takes it over and removes it.
    """

    def __init__(self, out_dir: Path):
        self.path, self.out_dir, self._fd = out_dir.with_name(f".{out_dir.name}.lock"), out_dir, None

    def acquire(self) -> None:
        import fcntl

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise AttrdistError(f"{self.out_dir}: another packer is writing this output right now "
                                    f"({self.path} is locked); wait for it to finish") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self._fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)  # removed by the holder that just finished: lock the new one
        raise AttrdistError(f"{self.out_dir}: could not lock {self.path}; another packer keeps replacing it")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


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
                 overwrite: bool = False, job: dict | None = None, inputs=()):
        self.out_dir = Path(out_dir)
        self.dataset, self.attributes, self.label_fields = dataset, list(attributes), list(label_fields)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.job = pack_job(dataset=dataset, attributes=attributes, label_fields=label_fields,
                            max_samples=max_samples, max_bytes=max_bytes, job=job)
        self.identity = pack_identity(self.job)
        check_out_dir(self.out_dir, inputs=inputs, overwrite=overwrite, identity=self.identity)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = PackLock(self.out_dir)
        self._lock.acquire()
        try:
            check_out_dir(self.out_dir, inputs=inputs, overwrite=overwrite, identity=self.identity)  # now we hold it
            self.staging = self.out_dir.with_name(f".{self.out_dir.name}.staging")
            self.splits: dict[str, dict[str, Any]] = {}
            self._open: dict[str, tuple[object, Path, int, int, dict]] = {}  # split -> (TarShardWriter, ...)
            self._skip: dict[str, int] = {}
            self.committed = False
            self.resumed_samples = 0
            self._writing = self.staging  # the file being written (for error messages)
            self._resume_or_reset()
        except BaseException:
            self._lock.release()
            raise

    # -------------------------------------------------------------- resume
    def _resume_or_reset(self) -> None:
        progress = self.staging / "progress.json"
        if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
            raise AttrdistError(f"{self.staging}: in the way of this pack's staging folder and not one; move it away")
        foreign = _foreign(self.staging, STAGING_FILES) if self.staging.is_dir() else []
        if foreign:
            raise AttrdistError(f"{self.staging}: this staging folder holds {len(foreign)} files attrdist did not write "
                                f"({', '.join(foreign[:3])}); move them out of it, then run again")
        if self.staging.is_dir() and progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except ValueError:
                state = {}
            if state.get("job") == self.job:
                self.splits = state["splits"]
                keep = {s["file"] for info in self.splits.values() for s in info["shards"]}
                for p in self.staging.iterdir():
                    if p.name not in keep and p.name.removesuffix(".record") not in keep and p.name != "progress.json":
                        p.unlink()
                self._skip = {k: v["nsamples"] for k, v in self.splits.items()}
                self.resumed_samples = sum(self._skip.values())
                log.info("%s: resuming an interrupted pack: %d samples in %d finished shards kept", self.out_dir,
                         self.resumed_samples, len(keep))
                return
        if self.staging.is_dir():
            if any(self.staging.iterdir()):
                log.info("%s: discarding the staging folder of an interrupted pack of other inputs", self.out_dir)
            for p in self.staging.iterdir():  # only what a pack writes (checked above)
                p.unlink()
        self.staging.mkdir(parents=True, exist_ok=True)

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
        with self.write_errors():
            return self._add(split, key, sample, crc32 or {})

    def _check_names(self, split: str, key: str, sample: dict) -> None:
        check_sample_names(self.out_dir, split, key, sample)

    @contextlib.contextmanager
    def write_errors(self):
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
        record = sample_record(sample, index, crc32, self.label_fields, counts)
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
        with self.write_errors():
            return self._commit(sources, options, report)

    def _commit(self, sources: list[dict], options: dict, report: dict | None) -> dict:
        for split in list(self._open):
            self._close_shard(split)
        splits = {k: {kk: vv for kk, vv in v.items() if kk != "last_key"} for k, v in self.splits.items()}
        recorded = {s["file"] for info in splits.values() for s in info["shards"]}
        for p in self.staging.iterdir():  # resume records, shards left unfinished or not reused: never published
            if p.name.endswith((".tar.record", ".partial")) or (p.name.endswith(".tar") and p.name not in recorded):
                p.unlink()
        manifest = {
            "format": FORMAT, "dataset": self.dataset, "attrdist_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "attributes": self.attributes,
            "label_fields": self.label_fields, "splits": splits, "sources": sources,
            "options": options, "report": report or {}, "identity": self.identity,
        }
        for split, info in splits.items():  # what wids/webdataset pipelines open (attrdist.pack.index)
            self._writing = self.staging / wids_name(split)
            atomic.write_json(self._writing, wids_descriptor(f"{self.dataset}-{split}", info["shards"]))
        self._writing = self.staging / MANIFEST
        atomic.write_json(self.staging / MANIFEST, manifest)
        (self.staging / "progress.json").unlink(missing_ok=True)  # after: a failed write above can still resume
        atomic.replace_dir(self.staging, self.out_dir)
        self.committed = True
        return manifest

    # -------------------------------------------------------------- whole shards written elsewhere
    def take_finished(self) -> dict[str, tuple[dict, dict]]:
        """The shards an interrupted pack of this job finished, with their `.record`s (file name -> (manifest
        entry, record)), now forgotten: the caller records every shard again with `record_shard`, a finished
        one only where its plan and sha256 still match, so that no shard is kept on trust. Shards without a
        record (written by `add`) are not offered; they are replaced or removed at `commit`."""
        finished = {}
        for info in self.splits.values():
            for s in info["shards"]:
                try:
                    finished[s["file"]] = (s, json.loads((self.staging / f"{s['file']}.record").read_text()))
                except (OSError, ValueError):
                    pass
        self.splits, self._skip = {}, {}
        return finished

    def record_shard(self, split: str, name: str, shard: dict) -> None:
        """Record, in order, a whole shard written (and fsync'ed) into the staging folder as `<name>.partial`, with
        its resume record as `<name>.record.partial` (`write_shard`, `write_record`: both renamed here), or, with
        `shard["reused"]`, a finished one already there. `shard`: its nsamples, bytes, sha256, label_counts.
        progress.json, written last, fsyncs the folder, which makes the renames durable with it; where it cannot
        be written (a full disk: the workers may fill it meanwhile), the renames are undone, so that every
        `<split>-NNNNNN.tar` in the staging folder is a shard progress.json lists."""
        with self.write_errors():
            renamed = []
            try:
                if not shard.get("reused"):
                    for temp, final in ((f"{name}.partial", name), (f"{name}.record.partial", f"{name}.record")):
                        self._writing = self.staging / temp
                        os.replace(self._writing, self.staging / final)
                        renamed.append((final, temp))
                info = self._split(split)
                info["shards"].append({"file": name, "nsamples": shard["nsamples"], "bytes": shard["bytes"],
                                       "sha256": shard["sha256"]})
                info["nsamples"] += shard["nsamples"]
                for f in self.label_fields:
                    info["label_counts"][f] = [a + b for a, b in zip(info["label_counts"][f],
                                                                     shard["label_counts"][f])]
                self._writing = self.staging / "progress.json"
                self._save_progress()
            except BaseException:
                for final, temp in reversed(renamed):
                    with contextlib.suppress(OSError):
                        os.replace(self.staging / final, self.staging / temp)
                if self.splits.get(split, {}).get("shards", [{}])[-1].get("file") == name:
                    info = self.splits[split]
                    info["shards"].pop()
                    info["nsamples"] -= shard["nsamples"]
                    for f in self.label_fields:
                        info["label_counts"][f] = [a - b for a, b in zip(info["label_counts"][f],
                                                                         shard["label_counts"][f])]
                raise

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

    def write_file(self, name: str, data: bytes) -> Path:
        """A file published with the shards (coco_<split>.json, drops.jsonl), fsync'ed into the staging folder."""
        if not STAGING_FILES.fullmatch(name):
            raise ValueError(f"{name}: not a file name a pack may hold (writer.PUBLISHED_FILES)")
        path = self._writing = self.staging / name
        with self.write_errors(), open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return path


def check_sample_names(where, split: str, key: str, sample: dict) -> None:
    """Tar member names are <key>.<ext>: plain names only, so the shard never holds a member that an
    unpacking tool could write outside its target, and WebDataset's key/extension split (at the
    first dot) gives the key back."""
    bad = [n for n in (key, *sample) if not isinstance(n, str) or not n or "/" in n or "." in n
           or unsafe_member_name(n) or not n.isprintable()]
    if bad or "/" in split or unsafe_member_name(split):
        raise AttrdistError(f"{where}: sample key {key!r} (split {split!r}, fields {list(sample)}) is not a "
                            f"plain name (no '/', '.', '\\', '..' or control characters); fix the ids in the "
                            f"input annotations")


def sample_record(sample: dict, index: int, crc32: dict[str, int], label_fields, counts: dict[str, list]) -> dict:
    """The members written for one sample: its bytes, and its JSON with "index" (its position in the split) and
    "crc32" (taken here for the members `crc32` does not give); its labels are added to `counts`."""
    meta = dict(sample["json"])
    meta["index"] = index
    meta["crc32"] = {k: crc32[k] if k in crc32 else zlib.crc32(v)  # checked when read
                     for k, v in sample.items() if k != "json"}
    for f in label_fields:
        for a in meta.get(f, []):
            counts[f][a] += 1
    return {**{k: v for k, v in sample.items() if k != "json"}, "json": json.dumps(meta).encode()}


def write_shard(path: Path, split: str, samples, *, start: int, label_fields, nattrs: int, where) -> dict:
    """Write one whole shard to `path` (a temporary name: `PackWriter.record_shard` renames it) from `samples`,
    (key, {ext: bytes, "json": sample JSON}, crc32 or None) in order, indexed from `start`; fsync'ed. Returns
    {"nsamples", "bytes", "sha256", "label_counts"}; with no sample, writes nothing (nsamples 0). A name that is
    not plain stops before the shard is written (`check_sample_names`, naming `where`); a write error is raised
    as an OSError naming `path`. Runs in a packer's worker process."""
    counts = {f: [0] * nattrs for f in label_fields}
    writer, n = None, 0
    try:
        for key, sample, crc32 in samples:
            check_sample_names(where, split, key, sample)
            if writer is None:
                writer = TarShardWriter(path)
            writer.add(key, sample_record(sample, start + n, crc32 or {}, label_fields, counts))
            n += 1
        if writer is None:
            return {"nsamples": 0, "bytes": 0, "sha256": None, "label_counts": counts}
        sha256 = writer.close()
        writer = None
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if writer is not None:
            writer.abort()
    return {"nsamples": n, "bytes": path.stat().st_size, "sha256": sha256, "label_counts": counts}


def write_record(path: Path, record: dict) -> None:
    """A shard's resume record (JSON) at `path`, fsync'ed; `PackWriter.record_shard` renames it. In a worker."""
    try:
        with open(path, "wb") as f:
            f.write(json.dumps(record).encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def pack_job(*, dataset: str, attributes: list[str], label_fields: list[str], max_samples: int, max_bytes: int,
             job: dict | None) -> dict:
    """What a resumed pack must match (progress.json's "job"), as JSON gives it back."""
    return json.loads(json.dumps({"dataset": dataset, "attributes": list(attributes), "label_fields": list(label_fields),
                                  "max_samples": max_samples, "max_bytes": max_bytes, "job": job or {}}, default=str))


def pack_identity(job: dict) -> dict:
    """What `check_out_dir` compares to decide that a pack may be replaced without --overwrite: the dataset
    name, a digest of the options, and a digest of the inputs (every input image's sha1, `job_identity`'s
    "items", and the annotation files read, its "sources" option)."""
    inner = dict(job.get("job") or {})
    items = inner.pop("items", None)
    opts = inner.get("options")
    sources = opts.get("sources") if isinstance(opts, dict) else None
    if isinstance(opts, dict):
        inner["options"] = {k: v for k, v in opts.items() if k != "sources"}

    def digest(x) -> str:
        return hashlib.sha1(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()

    return {"dataset": job.get("dataset"), "options": digest({**job, "job": inner}),
            "inputs": digest([items, sources]) if items is not None or sources is not None else None}
