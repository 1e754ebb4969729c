"""Remote packs and the node cache (attrdist.data.remote) against real servers on 127.0.0.1: nginx
(Debian's nginx-light, installed by the fixture when missing) serving a pack over HTTP, moto's
standalone S3 server holding the same pack (read through s3fs, endpoint from AWS_ENDPOINT_URL), and a
small Python HTTP server that cuts every shard transfer halfway. Faults are real: a deleted file (404),
a cut connection, a modified shard (sha256), a tmpfs cache that is too small (ENOSPC); several processes
asking for one shard at once (nginx's access log counts the GETs)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from attrdist.data import remote
from attrdist.data.reader import ShardError, ShardReader, load_manifest
from attrdist.errors import AttrdistError
from tests.conftest import FAST, run_env, run_recipe

pytestmark = pytest.mark.remote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def ensure_nginx() -> str:
    """The nginx binary; installed from Debian's nginx-light when missing (like slurm/testcluster.sh does)."""
    for path in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if path and os.access(path, os.X_OK):
            return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("nginx is not installed and cannot be (needs root and apt-get): apt-get install nginx-light")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"nginx-light could not be installed: {p.stderr.strip()[-200:]}")
    return shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx serving `root` on 127.0.0.1:<free port> with its own config, logs and pid file in `work`;
    `autoindex`: folders answer with nginx's directory listing (else 403, nginx's default)."""

    def __init__(self, root: Path, work: Path, autoindex: bool = False):
        self.root, self.work, self.port = root, work, free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.access = work / "access.log"
        conf = work / "nginx.conf"
        conf.write_text(f"""
daemon off;
worker_processes 2;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format plain '$request_method $uri $status $body_bytes_sent';
    access_log {self.access} plain;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    types {{ application/json json; application/x-tar tar; }}
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        autoindex {"on" if autoindex else "off"};
    }}
}}
""")
        self.proc = subprocess.Popen([ensure_nginx(), "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as e:
            self.stop()
            pytest.skip(f"nginx did not start: {e}: {(work / 'error.log').read_text()[-300:] if (work / 'error.log').exists() else ''}")
        self.url = f"http://127.0.0.1:{self.port}"

    def gets(self, name: str) -> int:
        """GET requests for /.../<name> in the access log."""
        lines = self.access.read_text().splitlines() if self.access.exists() else []
        return sum(1 for line in lines if line.startswith("GET ") and line.split()[1].endswith("/" + name))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def served(small_shards, tmp_path_factory):
    """nginx serving a directory holding a copy of the demo pack at /pack/ (tests may change their own copies)."""
    www = tmp_path_factory.mktemp("www")
    shutil.copytree(small_shards, www / "pack")
    server = Nginx(www, tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def copy_pack(server: Nginx, name: str, small_shards: Path) -> str:
    """A fresh copy of the demo pack served at /<name>/; its URL."""
    dst = server.root / name
    shutil.copytree(small_shards, dst)
    return f"{server.url}/{name}/"


class Cache:
    """What a cache's knobs look like to load_manifest (a DataConfig has these fields)."""

    def __init__(self, cache_dir, limit_gb=1.0, prefetch=4):
        self.cache_dir, self.cache_limit_gb, self.prefetch_shards = str(cache_dir), limit_gb, prefetch


def cached_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*") if p.is_file() and LOCKS not in p.parts and p.name != remote.EVICT_LOCK)


LOCKS = remote.LOCKS


def assert_nothing_half_written(cache_dir: Path, manifest) -> None:
    """Every file in the cache is a complete shard whose sha256 is the manifest's: no temp file, no partial."""
    want = {s["file"]: s["sha256"] for info in manifest.data["splits"].values() for s in info["shards"]}
    for p in cached_files(cache_dir):
        assert not p.name.endswith(remote.PART), f"temp file left: {p}"
        assert p.name in want, f"not a shard: {p}"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == want[p.name], f"unverified bytes under a shard name: {p}"


def read_all(reader: ShardReader) -> list[dict]:
    return [reader[i] for i in range(len(reader))]


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.05)


# ---------------------------------------------------------------- reading over HTTP


def test_http_pack_reads_like_the_local_pack_and_downloads_lazily(served, small_shards, tmp_path):
    url = copy_pack(served, "lazy", small_shards)
    m = load_manifest(url, Cache(tmp_path / "cache"))
    local = load_manifest(small_shards)
    assert m.data == local.data and m.root == url.rstrip("/")
    reader = ShardReader(m, "train")
    assert served.gets("train-000000.tar") == 0 and not cached_files(tmp_path / "cache")  # nothing fetched yet
    first = reader[0]
    assert served.gets("train-000000.tar") == 1 and served.gets("train-000001.tar") == 0  # only the shard read
    assert first == ShardReader(local, "train")[0]
    assert read_all(reader) == read_all(ShardReader(local, "train"))
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert served.gets(name) == 1
    assert_nothing_half_written(tmp_path / "cache", m)
    # pickled (a spawned DataLoader worker): its own descriptors and locks, the cached copies, no GET
    import pickle
    assert read_all(pickle.loads(pickle.dumps(reader))) == read_all(reader)
    # the same pack again (another process, a later run): served from the cache, no GET
    assert read_all(ShardReader(load_manifest(url, Cache(tmp_path / "cache")), "train")) == read_all(reader)
    assert served.gets("train-000000.tar") == 1


def test_two_packs_never_collide_in_the_cache(served, small_shards, tmp_path):
    a = load_manifest(copy_pack(served, "pa", small_shards), Cache(tmp_path / "c"))
    other = served.root / "pb"
    shutil.copytree(small_shards, other)
    data = json.loads((other / "manifest.json").read_text())
    data["dataset"] = "another"
    (other / "manifest.json").write_text(json.dumps(data))
    b = load_manifest(f"{served.url}/pb", Cache(tmp_path / "c"))
    assert a.cache.dir != b.cache.dir and a.cache.dir.parent == b.cache.dir.parent


def test_bad_remote_manifest_is_one_line_naming_the_url(served, tmp_path, fast_retries):
    (served.root / "badjson").mkdir()
    (served.root / "badjson" / "manifest.json").write_text("{not json")
    with pytest.raises(AttrdistError, match=r"^http://127\.0\.0\.1:\d+/badjson/manifest\.json: not valid JSON") as e:
        load_manifest(f"{served.url}/badjson/", Cache(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(AttrdistError, match=r"/nopack/manifest\.json: not found on the server") as e:
        load_manifest(f"{served.url}/nopack/", Cache(tmp_path))
    assert "\n" not in str(e.value) and served.gets("nopack/manifest.json") == 1  # a 404 is not retried


def test_local_pack_prefetch_is_a_no_op(small_shards):
    reader = ShardReader(load_manifest(small_shards), "train")
    reader.prefetch([0, 1, 2])
    assert reader.cache is None and reader[0]["__key__"]


# ---------------------------------------------------------------- faults


def test_missing_shard_404_is_one_line_at_once(served, small_shards, tmp_path, caplog):
    url = copy_pack(served, "p404", small_shards)
    (served.root / "p404" / "train-000001.tar").unlink()
    m = load_manifest(url, Cache(tmp_path / "cache"))
    with pytest.raises(AttrdistError, match=r"p404/train-000001\.tar: not found on the server .*upload the shard") as e:
        m.cache.open("train-000001.tar")
    assert "\n" not in str(e.value) and served.gets("p404/train-000001.tar") == 1  # no retry
    # through the reader: a warning naming the URL, then every sample of that shard is a ShardError (corrupt)
    reader = ShardReader(m, "train")
    with pytest.raises(ShardError, match=r"p404/train-000001\.tar: sample #0: cannot be read"):
        reader[40]
    with pytest.raises(ShardError):
        reader[41]
    assert served.gets("p404/train-000001.tar") == 1  # the failure is kept, not re-fetched per sample
    assert any("p404/train-000001.tar: not found" in r.getMessage() for r in caplog.records)
    assert reader[0]["__key__"]  # the other shards still read
    assert_nothing_half_written(tmp_path / "cache", m)


def test_sha256_mismatch_downloads_once_more_then_one_line(served, small_shards, tmp_path):
    url = copy_pack(served, "psha", small_shards)
    shard = served.root / "psha" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    m = load_manifest(url, Cache(tmp_path / "cache"))
    with pytest.raises(AttrdistError, match=r"psha/train-000000\.tar: \d+ bytes with sha256 .* in two downloads.*not "
                                            r"the shard that was packed") as e:
        m.cache.open("train-000000.tar")
    assert "\n" not in str(e.value)
    assert served.gets("psha/train-000000.tar") == 2
    assert not cached_files(tmp_path / "cache")
    # restored on the server: the next attempt caches it
    shutil.copy(small_shards / "train-000000.tar", shard)
    os.close(m.cache.open("train-000000.tar"))
    assert_nothing_half_written(tmp_path / "cache", m)
    assert len(cached_files(tmp_path / "cache")) == 1


class CuttingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves its directory, but for every .tar sends only the first half and then closes the connection
    (mode "cut"), or answers 503 (mode "503")."""

    counts: dict = {}
    mode = "cut"

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).counts[self.path] = type(self).counts.get(self.path, 0) + 1
        if not self.path.endswith(".tar"):
            return super().do_GET()
        if self.mode == "503":
            return self.send_error(503, "busy")
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


@pytest.mark.parametrize("mode", ["cut", "503"])
def test_connection_cut_mid_shard_or_5xx_is_retried_then_one_line(mode, small_shards, tmp_path, fast_retries):
    handler = type("H", (CuttingHandler,), {"counts": {}, "mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(small_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        m = load_manifest(url, Cache(tmp_path / "cache"))
        with pytest.raises(AttrdistError, match=rf"127\.0\.0\.1:\d+/train-000000\.tar: download failed {remote.RETRIES} "
                                                r"times \(last: .*\); check the server and the network") as e:
            m.cache.open("train-000000.tar")
        assert "\n" not in str(e.value)
        assert handler.counts["/train-000000.tar"] == remote.RETRIES  # retried, then stopped
        assert not cached_files(tmp_path / "cache")  # nothing half-written entered the cache
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB tmpfs (room for one demo shard of ~190 KB, not two) as a cache disk."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_cache_disk_evicts_and_retries_then_one_line(served, small_shards, tmpfs):
    url = copy_pack(served, "pfull", small_shards)
    m = load_manifest(url, Cache(tmpfs, limit_gb=10))  # the limit allows far more than the disk holds
    os.close(m.cache.open("train-000000.tar"))  # 184 KB: fits
    os.close(m.cache.open("train-000001.tar"))  # 195 KB more does not: ENOSPC -> the first is evicted, retried
    assert [p.name for p in cached_files(tmpfs)] == ["train-000001.tar"]
    assert_nothing_half_written(tmpfs, m)
    # a disk that cannot hold the shard even empty: one line naming the cache dir and the knob
    (m.cache.dir / "train-000001.tar").unlink()
    filler = tmpfs / "user-file"  # a user's file: never evicted
    filler.write_bytes(b"x" * 100_000)
    with pytest.raises(AttrdistError, match=rf"^{tmpfs}: disk full while caching .*pfull/train-000001\.tar .*data\.cache_dir") as e:
        m.cache.open("train-000001.tar")
    assert "\n" not in str(e.value) and filler.stat().st_size == 100_000
    filler.unlink()
    assert_nothing_half_written(tmpfs, m)


def test_disk_full_in_the_middle_of_a_download(served, small_shards, tmpfs):
    """ENOSPC from a real write (the free-space check passes: the manifest under-states the shard's size), then
    eviction and a retry; what the retry downloads fails the size check twice: one line, nothing kept."""
    url = copy_pack(served, "pmid", small_shards)
    data = json.loads((served.root / "pmid" / "manifest.json").read_text())
    data["splits"]["train"]["shards"][1]["bytes"] = 50_000  # 195 KB on the server
    (served.root / "pmid" / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(url, Cache(tmpfs, limit_gb=10))
    os.close(m.cache.open("train-000000.tar"))  # 184 KB of 256 KB
    with pytest.raises(AttrdistError, match=r"pmid/train-000001\.tar: 194560 bytes with sha256 .* in two downloads"):
        m.cache.open("train-000001.tar")
    assert served.gets("pmid/train-000001.tar") == 3  # cut by ENOSPC, then two whole downloads that fail the check
    assert not cached_files(tmpfs)  # the first shard was evicted to make room; no temp file is left


def test_shard_larger_than_the_limit_says_the_limit_needed(served, small_shards, tmp_path):
    m = load_manifest(copy_pack(served, "plimit", small_shards), Cache(tmp_path / "c", limit_gb=0.0001))
    with pytest.raises(AttrdistError, match=r"train-000001\.tar: this shard alone is 0\.001 GB, more than data\.cache_limit_gb="
                                            r"0\.0001; set data\.cache_limit_gb to at least 0\.001$"):
        m.cache.open("train-000001.tar")


def test_limit_evicts_least_recently_used_first(served, small_shards, tmp_path):
    m = load_manifest(copy_pack(served, "plru", small_shards), Cache(tmp_path / "c", limit_gb=0.0004))  # ~2 shards
    for name in ("train-000000.tar", "train-000001.tar"):
        os.close(m.cache.open(name))
        time.sleep(0.02)
    os.close(m.cache.open("train-000000.tar"))  # used again: now 000001 is the least recently used
    os.close(m.cache.open("val-000000.tar"))
    assert [p.name for p in cached_files(tmp_path / "c")] == ["train-000000.tar", "val-000000.tar"]


def test_eviction_never_touches_a_users_folders_in_the_cache_dir(served, small_shards, tmp_path):
    """data.cache_dir may be a folder that holds the user's own files and folders (even hex-named ones): the
    limit counts and evicts only the shards of pack folders this cache made."""
    mine = {tmp_path / "c" / "notes" / "old.tar": b"x" * 300_000, tmp_path / "c" / "0123456789abcdef" / "a.bin": b"y"}
    for path, data in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.utime(tmp_path / "c" / "notes" / "old.tar", (1, 1))  # the least recently used file of all
    m = load_manifest(copy_pack(served, "pusers", small_shards), Cache(tmp_path / "c", limit_gb=0.0004))
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"):
        os.close(m.cache.open(name))  # ~2 shards fit: the cache evicts its own
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert 1 <= len([p for p in cached_files(tmp_path / "c") if p.parent == m.cache.dir]) <= 2


def test_prefetch_downloads_in_the_background_and_keeps_its_window(served, small_shards, tmp_path):
    m = load_manifest(copy_pack(served, "ppre", small_shards), Cache(tmp_path / "c", limit_gb=0.0004, prefetch=2))
    reader = ShardReader(m, "train")
    reader.prefetch([1, 0, 2])  # window of 2: shards 1 and 0
    assert m.cache.wait_prefetched(60)
    assert {p.name for p in cached_files(tmp_path / "c")} == {"train-000000.tar", "train-000001.tar"}
    assert served.gets("ppre/train-000002.tar") == 0
    # the limit (~2 shards) is full of the pinned window: a shard outside it cannot be made room for now
    with pytest.raises(AttrdistError, match=r"no room in data\.cache_limit_gb=0\.0004 .*lower data\.prefetch_shards"):
        m.cache.open("val-000000.tar")
    reader.prefetch([2])  # the next window: 0 and 1 are unpinned, 2 evicts the least recently used
    assert m.cache.wait_prefetched(60)
    assert "train-000002.tar" in {p.name for p in cached_files(tmp_path / "c")}
    assert read_all(reader) == read_all(ShardReader(load_manifest(small_shards), "train"))
    assert_nothing_half_written(tmp_path / "c", m)


def _open_in_process(url: str, cache: str, file: str, start, out) -> None:
    m = load_manifest(url, Cache(cache))
    start.wait()
    fd = m.cache.open(file)
    try:
        out.put(hashlib.sha256(os.pread(fd, 1 << 24, 0)).hexdigest())
    finally:
        os.close(fd)


def test_four_processes_one_download_per_node(served, small_shards, tmp_path):
    url = copy_pack(served, "ponce", small_shards)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open_in_process, args=(url, str(tmp_path / "c"), "train-000001.tar", start, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    digests = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want = json.loads((small_shards / "manifest.json").read_text())
    sha = next(s["sha256"] for s in want["splits"]["train"]["shards"] if s["file"] == "train-000001.tar")
    assert digests == [sha] * 4
    assert served.gets("ponce/train-000001.tar") == 1


# ---------------------------------------------------------------- S3 (moto's server)


@pytest.fixture(scope="module")
def s3_pack(small_shards):
    """moto's standalone S3 server on 127.0.0.1 with the demo pack in s3://attrdist-test/pack/; the
    environment that points s3fs (botocore) at it: AWS_ENDPOINT_URL and dummy credentials."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (requirements/test.txt)")
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_port(port)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="attrdist-test")
        for p in small_shards.iterdir():
            s3.upload_file(str(p), "attrdist-test", f"pack/{p.name}")
        yield "s3://attrdist-test/pack/", env
    finally:
        server.stop()


def test_s3_pack_reads_like_the_local_pack(s3_pack, small_shards, tmp_path, monkeypatch):
    url, env = s3_pack
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    m = load_manifest(url, Cache(tmp_path / "c"))
    assert m.data == load_manifest(small_shards).data
    assert read_all(ShardReader(m, "val")) == read_all(ShardReader(load_manifest(small_shards), "val"))
    assert_nothing_half_written(tmp_path / "c", m)
    with pytest.raises(AttrdistError, match=r"s3://attrdist-test/nothere/manifest\.json: not found on the server"):
        load_manifest("s3://attrdist-test/nothere/", Cache(tmp_path / "c"))


# ---------------------------------------------------------------- training: bitwise the same losses


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["type"] == "train"]


@pytest.mark.slow
def test_training_from_http_and_s3_gives_the_local_losses_bitwise(served, s3_pack, small_shards, tmp_path):
    args = ["--profile", "demo", *FAST, "run.epochs=1", "data.num_workers=1"]
    runs = {}
    s3_url, s3_env = s3_pack
    for name, shards, env in (("local", str(small_shards), {}), ("http", copy_pack(served, "ptrain", small_shards), {}),
                              ("s3", s3_url, s3_env)):
        run_dir = tmp_path / name
        p = run_recipe([*args, f"data.shards={shards}", f"run.run_dir={run_dir}",
                        f"data.cache_dir={tmp_path / 'cache' / name}"], env=run_env(**env))
        runs[name] = _losses(run_dir)
        if name != "local":  # really read through the cache: the train split's shards are there, verified
            m = load_manifest(shards if name == "http" else small_shards, Cache(tmp_path / "cache" / name))
            assert {"train-000000.tar", "train-000001.tar", "train-000002.tar"} <= {
                f.name for f in cached_files(tmp_path / "cache" / name)}
            assert_nothing_half_written(tmp_path / "cache" / name, m)
            assert "Traceback" not in p.stdout + p.stderr and "Unclosed" not in p.stdout + p.stderr
    assert len(runs["local"]) == 6
    assert runs["http"] == runs["local"] and runs["s3"] == runs["local"]
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert served.gets(f"ptrain/{name}") == 1  # the rank and its worker: one download each


def test_cache_limit_too_small_for_the_order_stops_at_start(served, small_shards, tmp_path):
    """A cache that cannot hold what the order reads at once (the windows of every stream, open + next; for
    the full permutation the whole split) would evict shards still in use and fetch them again and again:
    the run stops before any step with one line giving the size it needs."""
    url = copy_pack(served, "tight", small_shards)
    base = ["--profile", "demo", *FAST, "run.epochs=1", f"data.shards={url}", f"data.cache_dir={tmp_path / 'c'}",
            "data.cache_limit_gb=0.0003"]
    for extra, needs in (([], "or lower data.shuffle_window or data.streams"),
                         (["data.order=permutation"], "or use data.order=windowed")):
        p = run_recipe([*base, *extra, f"run.run_dir={tmp_path / 'run'}"], check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "data.cache_limit_gb=0.0003 cannot hold what this node reads at once" in p.stderr
        assert needs in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "c").exists() or not cached_files(tmp_path / "c")
