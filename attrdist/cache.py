"""The one cache directory: $ATTRDIST_CACHE, else ~/.cache/attrdist (user home expanded in both).

Demo datasets and their packs, the demo CLIP, SLURM job folders and the JIT-built shared-memory
all-reduce (torch_extensions/) live under it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("ATTRDIST_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "attrdist"
