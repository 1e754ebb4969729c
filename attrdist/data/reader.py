"""Reading a pack: the manifest and indexed WebDataset tar shards (written by attrdist.pack.writer).

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

A pack may also be remote (`data.shards=https://host/pack/` or `s3://bucket/pack/`): its manifest is
fetched and checked the same way, and its shards are read from a node-local cache of whole, verified
copies (attrdist.data.remote), each indexed the first time one of its samples is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attrdist.data import remote
from attrdist.data.foreign import labels_from_problem
from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")
MANIFEST = "manifest.json"
FORMAT = "attrdist-shards-v1"




@dataclass(frozen=True)
class Manifest:
    root: Path | str  # a directory, or a remote pack's URL (no trailing '/')
    data: dict = field(repr=False)
    cache: remote.ShardCache | None = field(default=None, repr=False, compare=False)  # a remote pack's shards

    @property
    def attributes(self) -> list[str]:
        return self.data["attributes"]

    @property
    def label_fields(self) -> list[str]:
        return self.data["label_fields"]

    def split(self, name: str) -> dict:
        if name not in self.data["splits"]:
            raise AttrdistError(f"{remote.join(self.root, MANIFEST)}: no split {name!r} (have: {', '.join(self.data['splits'])})")
        return self.data["splits"][name]

    @property
    def shard_dir(self) -> Path | str:
        """Where the shard files are: the manifest's folder, or its "shard_base" (`attrdist index --out`: the
        manifest of foreign shards written into another folder; absolute, or relative to the manifest's; or the
        URL of the folder the shards are served from: then `cache` reads them)."""
        base = self.data.get("shard_base", "")
        return base if remote.is_remote(base) else Path(self.root) / base

    def has_split(self, name: str) -> bool:
        return name in self.data["splits"]

    def label_prior(self, split: str, label_field: str) -> np.ndarray:
        info = self.split(split)
        return np.asarray(info["label_counts"][label_field], dtype=np.float64) / max(1, info["nsamples"])


def load_manifest(root: str | os.PathLike, cache=None) -> Manifest:
    """The checked manifest of the pack at `root`: a directory or an https://, http:// or s3:// URL. `cache`
    (for a URL): where and how its shards are cached, an object with cache_dir, cache_limit_gb and
    prefetch_shards (a DataConfig); None = the defaults."""
    if remote.is_remote(root):
        return _load_remote_manifest(str(root), cache)
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
    _check_manifest(path, data)
    if remote.is_remote(data.get("shard_base", "")):  # `attrdist index URL --out`: shards through the node cache
        return Manifest(root, data, _shard_cache(path, data, data["shard_base"].rstrip("/"),
                                                 hashlib.sha256(path.read_bytes()).hexdigest(), cache))
    shard_dir = Manifest(root, data).shard_dir
    for split, info in data["splits"].items():
        for s in info["shards"]:
            if not (shard_dir / s["file"]).is_file():
                raise AttrdistError(f"{shard_dir / s['file']}: shard listed in {MANIFEST} is missing; re-pack or restore it")
    return Manifest(root, data)


def _check_manifest(path, data) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AttrdistError(f"{path}: format {got!r}, expected {FORMAT!r}; re-pack with this attrdist version")
    problem = _manifest_problem(data)
    if problem:
        raise AttrdistError(f"{path}: {problem}; the manifest is damaged or was not written by attrdist: re-pack the dataset")


def _load_remote_manifest(url: str, cache) -> Manifest:
    """A remote pack's manifest, checked like a local one; its shards are not touched here (each one is
    fetched when first read or prefetched: a missing one is a 404 then)."""
    root, raw, digest = remote.read_manifest(url)
    path = f"{root}/{MANIFEST}"
    data = remote.manifest_json(path, raw)
    _check_manifest(path, data)
    if data.get("shard_base") and not remote.is_remote(data["shard_base"]):
        raise AttrdistError(f"{path}: an `attrdist index --out` manifest (its shards are in {data['shard_base']!r}) "
                            f"cannot be read from a server; serve an index written beside its shards")
    return Manifest(root, data, _shard_cache(path, data, data.get("shard_base", root).rstrip("/"), digest, cache))


def _shard_cache(path, data: dict, url: str, digest: str, cache) -> remote.ShardCache:
    """The node cache of the shards at `url` that the manifest at `path` lists (`digest`: its sha256)."""
    for split, info in data["splits"].items():
        for s in info["shards"]:
            if not (isinstance(s.get("bytes"), int) and isinstance(s.get("sha256"), str)):
                raise AttrdistError(f"{path}: shard {s['file']} has no \"bytes\" and \"sha256\", which a remote pack "
                                    f"needs to verify its downloads; re-pack the dataset with this attrdist version")
    shards = {s["file"]: s for info in data["splits"].values() for s in info["shards"]}
    return remote.ShardCache(url, digest, shards, getattr(cache, "cache_dir", ""),
                             getattr(cache, "cache_limit_gb", remote.DEFAULT_LIMIT_GB),
                             getattr(cache, "prefetch_shards", remote.DEFAULT_PREFETCH))


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
    if "shard_base" in data and (not isinstance(data["shard_base"], str) or not data["shard_base"]):
        return "'shard_base' is not the path of the shards' folder"
    if "labels_from" in data and labels_from_problem(data["labels_from"]):
        return labels_from_problem(data["labels_from"])
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

    def __init__(self, path: Path | str, key: str, reason: str):
        super().__init__(f"{path}: sample {key}: {reason}")
        self.shard, self.key, self.reason = str(path).rsplit("/", 1)[-1], key, reason


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


def index_shard(path: Path, nsamples: int, fd: int | None = None) -> ShardIndex:
    """Index one shard (or the open descriptor `fd` of it, left open); a damaged or truncated shard keeps its
    complete leading samples, a shard with a member name that could escape an unpacking directory (or a
    link, a device...) is refused whole."""
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return ShardIndex([], f"cannot be opened ({e.strerror})", refused=True)
    try:
        size = os.fstat(fd).st_size
        members, problem = scan_tar(fd, size)
    except OSError as e:
        return ShardIndex([], f"cannot be read ({e.strerror})", refused=True)
    finally:
        if own:
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

    A split of at most `EAGER_MAX_SHARDS` local shards is indexed when the reader is made (`index_shard`:
    its tar headers, checked), so a damaged shard is reported once, up front, naming it; DataLoader workers
    forked later inherit the index. A larger split is indexed lazily: each process indexes a shard the first
    time it reads one of its samples (with the same warnings, from that process), and keeps the index of at
    most `max_indexed` shards (least recently used dropped). Measured (bench/scale.py): indexing costs
    ~23 ms per 1000-sample shard, so an eager index of 100k shards would take ~40 min per rank before the
    first batch, and its memory (~0.4 MB per 1000 samples) grows with the split, not with what a rank reads.
    Bytes are read with pread on a per-process file descriptor, opened on first use (at most `max_open` per
    process, oldest closed first). A sample that cannot be read (its shard truncated, damaged or refused)
    raises `ShardError`; the data loader counts it as corrupt (data.max_corrupt) instead of stopping.

    A remote pack (`manifest.cache` set) is always indexed lazily and not downloaded here: each shard comes
    from the node cache (`ShardCache.open`: fetched and verified first if needed); a shard that cannot be
    fetched is warned about once, naming its URL, and its samples raise `ShardError`. At most
    `MAX_OPEN_REMOTE` cached shards stay open per process, so evicted shards free their disk space.
    `prefetch(shard_numbers)` starts their download ahead.
    """

    EAGER_MAX_SHARDS = 256
    MAX_OPEN_REMOTE = 8
    MAX_OPEN_LOCAL = 128

    def __init__(self, manifest: Manifest, split: str, max_indexed: int = 256):
        info = manifest.split(split)
        self.split, self.root, self.cache = split, manifest.root, manifest.cache
        self.shards = info["shards"]
        self.paths = [remote.join(self.cache.url, s["file"]) if self.cache is not None else
                      str(manifest.shard_dir / s["file"]) for s in info["shards"]]
        self.labels_from = manifest.data.get("labels_from")  # foreign shards: where labels are (data.foreign)
        self.lengths = np.asarray([s["nsamples"] for s in info["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.unreadable = 0  # samples listed in the manifest that no shard can give (lazy: of the shards indexed)
        self.lazy = self.cache is not None or len(self.paths) > self.EAGER_MAX_SHARDS
        self.max_indexed = max_indexed  # lazy: shards whose index a process keeps
        self.max_open = self.MAX_OPEN_REMOTE if self.cache is not None else self.MAX_OPEN_LOCAL
        self._warned = 0
        self._fds: dict[int, int] = {}
        self._indexed: dict[int, None] = {}  # lazy: the shards this process indexed, least recently used first
        self._pid = None
        if self.lazy:
            self.index: list[ShardIndex | None] = [None] * len(self.paths)
            return
        self.index = [index_shard(Path(p), int(n)) for p, n in zip(self.paths, self.lengths)]
        for path, s, idx in zip(self.paths, info["shards"], self.index):
            self._report(path, s, idx)
        if self._warned > 20:
            log.warning("%s: %d shards of split %r are damaged or changed (the first 20 named above), %d samples cannot "
                        "be read; re-pack the dataset", manifest.root, self._warned, split, self.unreadable)

    def _report(self, path: str, s: dict, idx: ShardIndex) -> None:
        """Count a shard's unreadable samples and warn (the first 20 shards by name) when it is damaged or changed."""
        lost = s["nsamples"] if idx.refused else s["nsamples"] - len(idx.samples)
        self.unreadable += lost
        changed = s.get("bytes") is not None and idx.size != s["bytes"]
        self._warned += bool(idx.problem or changed)
        if self._warned > 20 and (idx.problem or changed):
            return  # the first 20 are named; a summary counts the rest
        if idx.problem:
            log.warning("%s: %s; %d of its %d samples cannot be read: they are skipped and counted as corrupt "
                        "(data.max_corrupt); restore the shard or re-pack the dataset", path, idx.problem, lost,
                        s["nsamples"])
        elif changed:
            log.warning("%s: %d bytes where %s says %d: the shard changed after packing; samples that no longer "
                        "decode are skipped and counted as corrupt; restore the shard or re-pack the dataset",
                        path, idx.size, MANIFEST, s["bytes"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in that shard) of sample `index` of the split."""
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return shard, index - int(self.starts[shard])

    def prefetch(self, shard_numbers: list[int]) -> None:
        """Start downloading these shards (in this order; the first data.prefetch_shards of them) into the node
        cache in the background, keeping them there until the next call; returns at once. A local pack: nothing."""
        if self.cache is not None:
            self.cache.prefetch([self.shards[k]["file"] for k in shard_numbers])

    def _this_process(self) -> None:
        if self._pid != os.getpid():  # a fresh worker process (or unpickled): descriptors of its own
            self._fds, self._indexed, self._pid = {}, {}, os.getpid()

    def _fd(self, shard: int) -> int:
        self._this_process()
        if shard not in self._fds:
            if self.cache is None:
                fd = os.open(self.paths[shard], os.O_RDONLY)
            else:
                fd = self.cache.open(self.shards[shard]["file"])  # AttrdistError: cannot be fetched
            while len(self._fds) >= self.max_open:  # oldest first (dicts keep insertion order)
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[shard] = fd
        return self._fds[shard]

    def _lazy_index(self, shard: int) -> ShardIndex:
        """Index a shard in this process (a remote one from its verified cached copy, fetched now if needed),
        keeping at most `max_indexed` shards' indexes."""
        self._this_process()
        s = self.shards[shard]
        try:
            idx = index_shard(Path(self.paths[shard]), s["nsamples"], fd=self._fd(shard))
        except OSError as e:
            idx = ShardIndex([], f"cannot be opened ({e.strerror})", refused=True)
            self._report(self.paths[shard], s, idx)
        except AttrdistError as e:
            idx = ShardIndex([], f"cannot be fetched ({e})", refused=True)
            log.warning("%s; its %d samples are skipped and counted as corrupt (data.max_corrupt)", e, s["nsamples"])
            self.unreadable += s["nsamples"]
        else:
            self._report(self.paths[shard], s, idx)
        self.index[shard] = idx
        self._indexed[shard] = None
        while len(self._indexed) > max(1, self.max_indexed):
            oldest = next(iter(self._indexed))
            del self._indexed[oldest]
            self.index[oldest] = None
        return idx

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard, pos = self.locate(index)
        path, idx = self.paths[shard], self.index[shard]
        if idx is None:  # lazy: a shard not indexed by this process (or the one it was forked from), or dropped
            idx = self._lazy_index(shard)
        elif self.lazy:
            self._indexed[shard] = self._indexed.pop(shard, None)  # most recently used
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
        except AttrdistError as e:  # a remote shard closed (too many open) and now cannot be fetched again
            raise ShardError(path, key, f"cannot be fetched again ({e})") from None
        return out

    def __del__(self):
        with contextlib.suppress(Exception):  # also half-made readers, and interpreter shutdown
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
