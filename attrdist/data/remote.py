"""Remote packs (https://, http://, s3://) and the node-local shard cache that training reads them from.

    data.shards=https://host/pack/      # nginx, any static HTTP server (fsspec + aiohttp)
    data.shards=s3://bucket/pack/       # S3 or an S3-protocol server (s3fs; endpoint: AWS_ENDPOINT_URL)

`read_manifest(url)` fetches <url>/manifest.json (validated by attrdist.data.reader like a local one).
`ShardCache` then downloads each shard WHOLE into <data.cache_dir>/<first 16 hex of the manifest's
sha256>/<shard file> (so two packs never collide), and `ShardReader` reads it there by pread like a
local shard. The rules, each of which the transfer libraries leave to the caller:

- a shard enters the cache only by an atomic rename of a temp file whose size and sha256 match the
  manifest: nothing half-written or unverified ever has a shard's name;
- once per node: a per-shard flock (<pack dir>/.locks/<file>) makes a second process (rank or DataLoader
  worker) that wants the same shard wait for the first one's download instead of fetching it again;
- a size limit (data.cache_limit_gb) over the whole cache dir, kept by evicting complete shards least
  recently used first (mtime, touched on every open) under one cache-wide flock (.evict.lock). A shard
  that some process holds a lock on (being downloaded, or pinned in a prefetch window with a shared
  lock) is never evicted; one being read may be (the reader's open descriptor keeps its bytes);
- faults: a cut connection, a timeout or a 5xx is retried with backoff (RETRIES times) and then one line
  naming the URL; a 404 (or 403) is one line at once; a size/sha256 mismatch is downloaded once more,
  then one line; a full disk (ENOSPC) evicts what it can and retries once, then one line naming the
  cache dir and the knob;
- `prefetch(files)`: a background thread downloads them in order and pins them (shared flock) until
  the next window; it never evicts a shard of its window to make room for a later one (it stops there).

Why own code and not fsspec's `filecache::`/`blockcache::` or webdataset's cache: neither checks a
sha256 before use, locks across processes, or bounds the cache with LRU eviction (fsspec's
CachingFileSystem keeps a per-instance JSON of what it holds, written by every process, and
webdataset's cache writes whole shards without a checksum or a limit). The transfers themselves are
fsspec's (`get_file`: one streaming GET per shard, for http and s3 alike).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

from attrdist import atomic
from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")
SCHEMES = ("http://", "https://", "s3://")
RETRIES = 5  # attempts for a transfer cut, timed out or answered 5xx
BACKOFF_S = 0.5  # first wait between attempts; doubled each time
DEFAULT_LIMIT_GB = 100.0
DEFAULT_PREFETCH = 0  # no cap: every shard of the windows the order has open or opens next
LOCKS, EVICT_LOCK, PART = ".locks", ".evict.lock", ".part"
_PACK_DIR = re.compile(r"[0-9a-f]{16}")  # <first 16 hex of a manifest's sha256>, holding LOCKS: made here


def is_remote(shards: str | os.PathLike) -> bool:
    return isinstance(shards, str) and shards.startswith(SCHEMES)


def join(root, name: str) -> str:
    """`root`/`name` for a local path or a URL (Path() would fold a URL's '//')."""
    return f"{root}/{name}" if is_remote(str(root)) else str(Path(root) / name)


def filesystem(url: str):
    """The fsspec filesystem for `url` (s3: endpoint and credentials from the standard AWS_* variables)."""
    import fsspec

    try:
        # the endpoint as an explicit option: it is part of fsspec's instance-cache key, so a filesystem made
        # under an earlier AWS_ENDPOINT_URL is not reused (botocore reads it once, when the client is made).
        # Not skip_instance_cache: dropped http instances close their sessions' sockets from a finalizer,
        # measured to close a descriptor number the reader had reused for a shard ("Illegal seek")
        opts = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if url.startswith("s3://") and os.environ.get(
            "AWS_ENDPOINT_URL") else {}
        fs, _ = fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        raise AttrdistError(f"{url}: reading it needs a package that is not installed ({e}); run `make setup`") from None
    return fs


class NotFound(AttrdistError):
    """The server says the file is not there (404) or not for us (403): retrying cannot help."""


def _not_found(e: BaseException) -> bool:
    return isinstance(e, (FileNotFoundError, PermissionError)) or getattr(e, "status", None) in (403, 404)


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())[:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _retrying(url: str, call, *, not_found: str, gave_up: str, then: str, fatal=None):
    """`call()` with a remote read's retries: a 404/403 is one line at once (NotFound, ending in `not_found`);
    `fatal(e)` may turn an error into one line at once too; anything else (a cut, a timeout, a 5xx) is
    retried RETRIES times with doubling backoff, then one line: `<url>: <gave_up> (last: ...)`."""
    for attempt in range(RETRIES):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - aiohttp/botocore/OSError: classified below
            if _not_found(e):
                raise NotFound(f"{url}: not found on the server ({_describe(e)}); {not_found}") from None
            message = fatal(e) if fatal is not None else None
            if message:
                raise AttrdistError(message) from None
            if attempt == RETRIES - 1:
                raise AttrdistError(f"{url}: {gave_up} (last: {_describe(e)}); check the server and the network, "
                                    f"then {then}") from None
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", url, attempt + 1, _describe(e),
                        BACKOFF_S * 2 ** attempt)
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


def fetch_bytes(url: str) -> bytes:
    """The whole of a small remote file (the manifest), with the same retries as a shard."""
    fs = filesystem(url)
    return _retrying(url, lambda: fs.cat_file(url), gave_up=f"could not be fetched in {RETRIES} attempts",
                     then="rerun", not_found="check data.shards (the pack's URL, ending in its directory) and that "
                                             "manifest.json was uploaded")


def default_cache_dir() -> Path:
    from attrdist.cache import cache_dir

    return cache_dir() / "shards"


class ShardCache:
    """The node-local copies of one remote pack's shards (see the module docstring).

    `open(file)` -> a read-only descriptor of the verified local copy (downloaded first if needed,
    blocking); `prefetch(files)` -> returns at once, downloads in a background thread. Safe to use from
    several processes (ranks, forked DataLoader workers) and threads at once."""

    def __init__(self, url: str, digest: str, shards: dict[str, dict], cache_dir: str | os.PathLike = "",
                 limit_gb: float = DEFAULT_LIMIT_GB, prefetch_shards: int = DEFAULT_PREFETCH):
        self.url = url.rstrip("/")
        self.shards = shards  # file -> manifest entry {"bytes", "sha256", ...}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.dir = self.cache_dir / digest[:16]
        self.limit = int(limit_gb * 1e9)
        self.limit_gb, self.prefetch_shards = limit_gb, prefetch_shards
        self._pid = None

    # per-process state: descriptors and threads never cross a fork
    def _local(self) -> None:
        if self._pid != os.getpid():
            for fd in getattr(self, "_lock_fds", {}).values():  # a fork's copies: closing them leaves the parent's locks
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pid = os.getpid()
            self._fs = None
            self._lock_fds: dict[str, int] = {}
            self._tlocks: dict[str, threading.Lock] = {}
            self._guard = threading.Lock()
            self._pinned: set[str] = set()
            self._failed: dict[str, AttrdistError] = {}
            self._window: list[str] = []
            self._wake = threading.Condition(self._guard)
            self._thread = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")} | {"_pid": None}

    @property
    def fs(self):
        self._local()
        if self._fs is None:
            self._fs = filesystem(self.url)
        return self._fs

    def _shard_lock(self, file: str) -> tuple[threading.Lock, int]:
        """This process's thread lock and flock descriptor for `file` (one description per process, so a
        pin and a download in two threads of one process never block each other; the thread lock orders them)."""
        self._local()
        with self._guard:
            if file not in self._lock_fds:
                (self.dir / LOCKS).mkdir(parents=True, exist_ok=True)
                self._lock_fds[file] = os.open(self.dir / LOCKS / file, os.O_RDWR | os.O_CREAT, 0o644)
                self._tlocks[file] = threading.Lock()
            return self._tlocks[file], self._lock_fds[file]

    # ------------------------------------------------------------------ reading
    def path(self, file: str) -> Path:
        return self.dir / file

    def open(self, file: str) -> int:
        """A read-only descriptor of the verified copy of `file`, downloading it first if it is not cached."""
        self._local()
        if file in self._failed:
            raise self._failed[file]
        for _ in range(3):  # evicted by another process between our download and our open: fetch again
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self.path(file), os.O_RDONLY)
                with contextlib.suppress(OSError):
                    os.utime(self.path(file))  # least recently used = oldest mtime
                return fd
            self.ensure(file)
        raise AttrdistError(f"{self.path(file)}: evicted three times before it could be opened; data.cache_limit_gb="
                            f"{self.limit_gb:g} is too small for the processes sharing {self.cache_dir}: raise it")

    def ensure(self, file: str, pin: bool = False, prefetching: bool = False) -> bool:
        """Make `file` present and verified in the cache (once per node: others wait on its flock). `pin`: keep
        a shared lock on it afterwards (no process evicts it) until `unpin`. `prefetching`: return False instead
        of evicting a pinned window's shard or waiting for room."""
        entry = self.shards[file]
        url, final = f"{self.url}/{file}", self.path(file)
        if entry.get("bytes") is not None and entry["bytes"] > self.limit:
            raise AttrdistError(f"{url}: this shard alone is {_gb(entry['bytes'])} GB, more than data.cache_limit_gb="
                                f"{self.limit_gb:g}; set data.cache_limit_gb to at least {_gb(entry['bytes'])}")
        tlock, fd = self._shard_lock(file)
        with tlock:
            ok = False
            fcntl.flock(fd, fcntl.LOCK_SH)  # a shared lock: present shards are checked without waiting on pins
            try:
                if final.is_file():
                    ok = True
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process downloads this shard
                    if final.is_file():
                        ok = True
                    else:
                        for p in self.dir.iterdir():  # a dead process's leftovers: we hold the shard's lock
                            if p.name.startswith(f".{file}.") and p.name.endswith(PART):
                                p.unlink(missing_ok=True)
                        ok = self._download(file, url, final, prefetching)
                if ok:
                    with contextlib.suppress(OSError):
                        os.utime(final)  # least recently used = oldest mtime
            finally:
                keep = file in self._pinned or (pin and ok)
                fcntl.flock(fd, fcntl.LOCK_SH if keep else fcntl.LOCK_UN)
            if keep:
                self._pinned.add(file)
        return ok

    def unpin(self, file: str) -> None:
        tlock, fd = self._shard_lock(file)
        with tlock:
            if file in self._pinned:
                self._pinned.discard(file)
                fcntl.flock(fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ downloading
    def _download(self, file: str, url: str, final: Path, prefetching: bool) -> bool:
        entry = self.shards[file]
        size, want = entry.get("bytes"), entry.get("sha256")
        part = self.dir / f".{file}.{os.getpid()}-{threading.get_ident()}.{size or 0}{PART}"
        mismatches = full_disk = cuts = 0
        while True:
            if not self._reserve(part, size or 0, url, prefetching):
                return False
            try:
                if size and shutil.disk_usage(self.dir).free < size:
                    raise OSError(errno.ENOSPC, "not enough free space for the shard")
                self.fs.get_file(f"{self.url}/{file}", str(part))
                got_size = part.stat().st_size
                got = atomic.sha256_file(part) if want else None
                if (size is not None and got_size != size) or (want and got != want):
                    mismatches += 1
                    if mismatches < 2:
                        log.warning("%s: %d bytes, sha256 %s..., where manifest.json says %s bytes, sha256 %s...; "
                                    "downloading it once more", url, got_size, (got or "?")[:12], size, (want or "?")[:12])
                        continue
                    raise AttrdistError(f"{url}: {got_size} bytes with sha256 {(got or '?')[:16]}... in two downloads, "
                                        f"manifest.json says {size} bytes, sha256 {(want or '?')[:16]}...: the file on "
                                        f"the server is not the shard that was packed; restore it or re-pack and upload "
                                        f"the dataset")
                with open(part, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(part, final)  # the only way a shard enters the cache
                atomic.fsync_dir(self.dir)
                return True
            except AttrdistError:
                raise
            except Exception as e:  # noqa: BLE001 - aiohttp/botocore/OSError: classified below
                if _not_found(e):
                    err = NotFound(f"{url}: not found on the server ({_describe(e)}) though manifest.json lists it; "
                                   f"upload the shard again or re-pack the dataset")
                    self._failed[file] = err
                    raise err from None
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    full_disk += 1
                    part.unlink(missing_ok=True)
                    freed = self._evict_for_disk(size or 0)
                    if full_disk < 2:
                        log.warning("%s: disk full while caching %s; evicted %d cached shards, retrying", self.cache_dir,
                                    file, freed)
                        continue
                    raise AttrdistError(f"{self.cache_dir}: disk full while caching {url} ({size} bytes; "
                                        f"{shutil.disk_usage(self.cache_dir).free} bytes free after evicting what was "
                                        f"not in use); free space there, or set data.cache_dir to a larger disk or lower "
                                        f"data.cache_limit_gb below its size") from None
                cuts += 1
                if cuts >= RETRIES:
                    raise AttrdistError(f"{url}: download failed {RETRIES} times (last: {_describe(e)}); check the "
                                        f"server and the network, then rerun (nothing partial was kept)") from None
                log.warning("%s: download attempt %d failed (%s); retrying in %.1f s", url, cuts, _describe(e),
                            BACKOFF_S * 2 ** (cuts - 1))
                time.sleep(BACKOFF_S * 2 ** (cuts - 1))
            finally:
                part.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _cache_wide_lock(self):
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cache_dir / EVICT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _entries(self) -> tuple[list[tuple[float, int, Path]], int]:
        """Complete cached shards of every pack under cache_dir [(mtime, bytes, path)], and the bytes that
        downloads in progress have reserved (stale temp files of dead processes are removed)."""
        done, reserved = [], 0
        for pack in self.cache_dir.iterdir() if self.cache_dir.is_dir() else ():
            if not (pack.is_dir() and _PACK_DIR.fullmatch(pack.name) and (pack / LOCKS).is_dir()):
                continue  # not a pack folder this cache made (data.cache_dir may hold a user's folders too)
            for p in pack.iterdir():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if p.name.endswith(PART):
                    if _free_lock(pack, p.name[1:].rsplit(".", 3)[0]):  # nobody downloads it: a dead process's
                        p.unlink(missing_ok=True)
                        continue
                    with contextlib.suppress(ValueError):
                        reserved += max(st.st_size, int(p.name[:-len(PART)].rsplit(".", 1)[1]))
                elif p.is_file() and not p.name.startswith(".") and p.name != "manifest.json":
                    done.append((st.st_mtime, st.st_size, p))
        return sorted(done), reserved

    def _reserve(self, part: Path, size: int, url: str, prefetching: bool) -> bool:
        """Make room for `size` bytes under the limit (LRU eviction) and create `part` (its name records the
        reservation) under the cache-wide lock. False (prefetching) when only pinned or in-flight shards stand
        in the way; a blocking caller waits for in-flight downloads, then stops with one line."""
        for wait in range(600):
            with self._cache_wide_lock():
                done, reserved = self._entries()
                used = sum(s for _, s, _ in done) + reserved
                for _, s, p in done:
                    if used + size <= self.limit:
                        break
                    if _evict(p):
                        used -= s
                if used + size <= self.limit:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    part.touch()
                    return True
            if prefetching:
                log.debug("%s: prefetch stops: the cache limit is held by pinned or in-flight shards", url)
                return False
            if not reserved:
                break
            time.sleep(0.5)  # other processes' downloads hold the room: they finish, then their shards can go
        raise AttrdistError(f"{url}: no room in data.cache_limit_gb={self.limit_gb:g} ({self.cache_dir}): the shards "
                            f"pinned by prefetch windows and downloads in progress hold {_gb(used)} GB; set "
                            f"data.cache_limit_gb to at least {_gb(used + size)} or lower data.prefetch_shards")

    def _evict_for_disk(self, size: int) -> int:
        """After ENOSPC: evict unlocked complete shards, least recently used first, until `size` bytes are free."""
        n = 0
        with self._cache_wide_lock():
            done, _ = self._entries()
            for _, _, p in done:
                if shutil.disk_usage(self.cache_dir).free >= size + (1 << 20):
                    break
                n += _evict(p)
        return n

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, files: list[str]) -> None:
        """Download `files` (the first data.prefetch_shards of them; 0 = all) in order in a background thread, and
        keep them pinned until the next call; returns at once. A failure is kept and raised by `open`."""
        self._local()
        window = list(dict.fromkeys(files))
        window = window[:self.prefetch_shards] if self.prefetch_shards else window
        for file in list(self._pinned):  # the last window's shards may go now (never while they were in it)
            if file not in window:
                self.unpin(file)
        with self._guard:
            self._window = window
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._prefetcher, name="attrdist-prefetch", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def _prefetcher(self) -> None:
        seen = None
        while True:
            with self._guard:
                while self._window is seen:
                    self._wake.wait()
                window = seen = self._window  # each prefetch() call sets a new list
            for file in window:
                if self._window is not window:
                    break  # a newer window: start over with it
                if file in self._failed:
                    continue
                try:
                    if not self.ensure(file, pin=True, prefetching=True):
                        break  # no room without evicting this window's shards: the rest waits for the next window
                except AttrdistError as e:
                    self._failed[file] = e  # raised by open() when the shard is read
                    log.debug("prefetch of %s failed: %s", file, e)
                except Exception as e:  # noqa: BLE001 - a thread must not die silently
                    log.warning("%s/%s: prefetch failed (%s); it is fetched when read", self.url, file, _describe(e))
                if file not in self._window:
                    self.unpin(file)

    def wait_prefetched(self, timeout: float = 60.0) -> bool:
        """True once every shard of the current window is pinned or failed (for tests and benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._local()
            if all(f in self._pinned or f in self._failed for f in self._window):
                return True
            time.sleep(0.05)
        return False


def _gb(n: int) -> str:
    """`n` bytes in GB, rounded up to the megabyte (a limit set to it holds them)."""
    return f"{math.ceil(n / 1e6) / 1e3:g}"


def _free_lock(pack: Path, file: str) -> bool:
    """True when no process holds a lock on `file`'s shard lock (nobody downloads or pins it)."""
    try:
        fd = os.open(pack / LOCKS / file, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases our lock, if we got one


def _evict(path: Path) -> bool:
    """Unlink a complete cached shard unless a process holds its lock (downloading or pinned). Readers with
    it open keep reading: on Linux an unlinked file lives while a descriptor is open."""
    lock = path.parent / LOCKS / path.name
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
        log.debug("cache: evicted %s", path)
        return True
    finally:
        os.close(fd)


def read_manifest(url: str) -> tuple[str, bytes, str]:
    """(root URL without the trailing '/', manifest bytes, their sha256) of the remote pack at `url`."""
    root = url.rstrip("/")
    raw = fetch_bytes(f"{root}/manifest.json")
    return root, raw, hashlib.sha256(raw).hexdigest()


def manifest_json(url: str, raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise AttrdistError(f"{url}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]}); re-pack "
                            f"and upload the dataset") from None


# ------------------------------------------------------------------ foreign shards at a URL (`attrdist index URL`)
def list_files(url: str) -> tuple[str, list[str]]:
    """(the folder's URL without the trailing '/', the names of the files directly in it) for `url`: a folder
    (s3: its objects; http(s): the links of the server's directory listing, e.g. nginx `autoindex on`) or a
    brace pattern of shard URLs in one folder (`https://host/shards/data-{000000..000099}.tar`, listed as
    given, nothing fetched; a URL ending in .tar: that one shard). One line when there is nothing to list."""
    if "{" in url or url.endswith(".tar"):
        from braceexpand import braceexpand

        try:
            urls = list(dict.fromkeys(braceexpand(url)))
        except Exception as e:  # noqa: BLE001 - braceexpand raises ValueError/IndexError on a bad pattern
            raise AttrdistError(f"{url}: not a valid brace pattern ({_describe(e)}); write it as "
                                f"https://host/shards/data-{{000000..000099}}.tar") from None
        folders = {u.rsplit("/", 1)[0] for u in urls}
        if len(folders) != 1 or any(not u.rsplit("/", 1)[1] for u in urls):
            raise AttrdistError(f"{url}: the brace pattern must name files in one folder (it names "
                                f"{len(folders)}); index each folder with its own attrdist index --out")
        return folders.pop(), [u.rsplit("/", 1)[1] for u in urls]
    base = url.rstrip("/")
    fs = filesystem(base)
    how = ("its objects" if base.startswith("s3://") else
           "the server's directory listing (e.g. nginx `autoindex on`)")
    hint = (f"name the shards with a brace pattern instead, e.g. attrdist index '{base}/data-{{000000..000099}}.tar'")
    try:
        fs.invalidate_cache(base)  # s3fs keeps listings per process: index what is there now
        entries = fs.ls(base if base.startswith("s3://") else base + "/", detail=True)
    except Exception as e:  # noqa: BLE001 - aiohttp/botocore/OSError
        if isinstance(e, FileNotFoundError) and base.startswith("s3://"):
            entries = []
        else:
            raise AttrdistError(f"{base}/: cannot list the files there through {how} ({_describe(e)}); {hint}") from None
    names = []
    plain = base.split("://", 1)[1]
    for e in entries:
        name = e["name"].split("://", 1)[-1]
        if e.get("type") == "directory" or not name.startswith(plain + "/"):
            continue
        rest = name[len(plain) + 1:]
        if rest and "/" not in rest and rest not in (".", ".."):
            from urllib.parse import unquote

            names.append(unquote(rest) if not base.startswith("s3://") else rest)
    if not names:
        raise AttrdistError(f"{base}/: no files found through {how}; check the URL, or {hint}")
    return base, sorted(set(names))


def download(url: str, dest: Path) -> None:
    """`url` streamed into `dest` (a temp file the caller deletes), retried like a cached shard: a cut, a
    timeout or a 5xx RETRIES times, then one line; a 404/403 is one line at once (NotFound)."""
    fs = filesystem(url)

    def disk_full(e: BaseException) -> str | None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return (f"{dest.parent}: disk full while downloading {url} to scan it; free space there or pass --out on "
                    f"a larger disk (the shard is downloaded beside it)")
        return None

    _retrying(url, lambda: fs.get_file(url, str(dest)), gave_up=f"download failed {RETRIES} times", then="index again",
              not_found="check the URL or the brace pattern's range, then index again", fatal=disk_full)
