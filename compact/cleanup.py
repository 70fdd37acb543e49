"""Remove old artifacts by age and by a disk quota, never those of a running job."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from compact.runs import RunStore


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _busy(store: RunStore) -> set[Path]:
    return {Path(r["artifact"]).resolve() for r in store.list(status="running") if r["artifact"]}


def clean(root: Path, max_age_hours: float, quota_bytes: int, store: RunStore | None = None,
          now: float | None = None) -> list[Path]:
    """Delete artifacts (entries two levels down: root/<session>/<artifact>) that are too old,
    then the oldest until the total fits the quota. Returns what was removed."""
    if not root.exists():
        return []
    now = now or time.time()
    busy = _busy(store or RunStore())
    entries = [p for session in root.iterdir() if session.is_dir() for p in session.iterdir()]
    entries = [p for p in entries
               if not any(p.resolve() == b or p.resolve() in b.parents or b in p.resolve().parents
                          for b in busy)]
    entries.sort(key=lambda p: p.stat().st_mtime)
    removed = []
    total = sum(_size(p) for p in entries)
    for p in entries:
        too_old = now - p.stat().st_mtime > max_age_hours * 3600
        if too_old or total > quota_bytes:
            total -= _size(p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed
