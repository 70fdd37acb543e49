import os
import time

import pytest

from compact import cleanup, runs, settings
from compact.errors import UserError


def _artifact(root, session, name, size, age_hours):
    path = root / session / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * size)
    stamp = time.time() - age_hours * 3600
    os.utime(path, (stamp, stamp))
    return path


def test_clean_by_age_and_quota_spares_running_jobs(tmp_path):
    root = tmp_path / "data"
    store = runs.RunStore(tmp_path / "runs.sqlite")
    old = _artifact(root, "s1", "old", 10, age_hours=100)
    old_running = _artifact(root, "s1", "old-running", 10, age_hours=100)
    store.start("distill", "default", artifact=str(old_running))
    a = _artifact(root, "s2", "a", 1000, age_hours=3)
    b = _artifact(root, "s2", "b", 1000, age_hours=2)
    c = _artifact(root, "s2", "c", 1000, age_hours=1)
    removed = cleanup.clean(root, max_age_hours=72, quota_bytes=2100, store=store)
    assert set(removed) == {old, a}
    assert old_running.exists() and b.exists() and c.exists()


def test_safe_path_stays_inside_allowed(tmp_path):
    allowed = (tmp_path / "data",)
    (tmp_path / "data" / "x").mkdir(parents=True)
    assert settings.safe_path(str(tmp_path / "data" / "x"), allowed) == (tmp_path / "data" / "x").resolve()
    for bad in (str(tmp_path / "data" / ".." / "elsewhere"), "/etc/passwd", str(tmp_path)):
        with pytest.raises(UserError, match="outside the folders"):
            settings.safe_path(bad, allowed)
    (tmp_path / "data" / "link").symlink_to("/etc")
    with pytest.raises(UserError, match="outside the folders"):
        settings.safe_path(str(tmp_path / "data" / "link" / "passwd"), allowed)


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACT_PORT", "8000")
    monkeypatch.setenv("COMPACT_AUTH", "ann:secret")
    monkeypatch.setenv("COMPACT_DATA", str(tmp_path))
    s = settings.load()
    assert s.port == 8000 and s.auth == ("ann", "secret") and s.data_dir == tmp_path.resolve()
    assert not s.allow_remote_code and not s.allow_pickle
    monkeypatch.setenv("COMPACT_PORT", "eighty")
    with pytest.raises(UserError, match="COMPACT_PORT must be an integer"):
        settings.load()
