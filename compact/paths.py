"""Where compact keeps its caches and run data (overridable with COMPACT_HOME)."""

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("COMPACT_HOME", Path.home() / ".cache" / "compact"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
