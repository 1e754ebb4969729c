"""Remote shards: download + verify throughput of the node cache (attrdist.data.remote.ShardCache) from
nginx on 127.0.0.1, 4 shards x 64 MiB of random bytes, cold and warm. Run from the repository root:

    python -m bench.remote_cache

nginx comes from Debian's nginx-light (tests/test_remote.py installs it when missing)."""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from attrdist.data.reader import load_manifest
from tests.test_remote import Cache, Nginx

base = Path(tempfile.mkdtemp(prefix="attrdist-remote-bench-"))
pack = base / "www" / "pack"; pack.mkdir(parents=True)
shards = []
for k in range(4):
    data = os.urandom(64 << 20)
    (pack / f"train-{k:06d}.tar").write_bytes(data)
    shards.append({"file": f"train-{k:06d}.tar", "nsamples": 1, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
(pack / "manifest.json").write_text(json.dumps({"format": "attrdist-shards-v1", "dataset": "bench", "attributes": ["a"], "label_fields": ["labels"],
    "splits": {"train": {"nsamples": 4, "shards": shards, "label_counts": {"labels": [0]}}}}))
srv = Nginx(base / "www", base / "nginx")
try:
    m = load_manifest(f"{srv.url}/pack/", Cache(base / "cache", limit_gb=10))
    t = time.perf_counter()
    for s in shards:
        os.close(m.cache.open(s["file"]))
    dt = time.perf_counter() - t
    print(f"cold: 4 x 64 MiB downloaded + sha256 + fsync + rename in {dt:.2f} s = {256 / dt:.0f} MiB/s")
    t = time.perf_counter()
    for s in shards:
        os.close(m.cache.open(s["file"]))
    print(f"warm: 4 opens from the cache in {1e3 * (time.perf_counter() - t):.2f} ms; GETs per shard: {[srv.gets(s['file']) for s in shards]}")
finally:
    srv.stop()
    shutil.rmtree(base, ignore_errors=True)
