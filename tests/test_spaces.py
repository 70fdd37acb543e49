"""Hugging Face Spaces conventions: Gradio's own server variables work, COMPACT_* override them
only where set, and the README's Space front matter agrees with the Dockerfile."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import psutil  # accelerate's dependency
import pytest

from compact import settings
from tests.helpers import ROOT


class _FakeApp:
    """Records what launch() passes to Gradio."""

    def queue(self, **kw):
        return self

    def launch(self, **kw):
        self.kw = kw
        return kw


def _launch_options(monkeypatch, **env) -> dict:
    from ui import app as app_mod
    from ui import state as st

    for name in ("COMPACT_HOST", "COMPACT_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(st, "SETTINGS", settings.load())
    monkeypatch.setattr(app_mod, "clean_periodically", lambda: None)
    return app_mod.launch(_FakeApp())


def test_host_and_port_are_left_to_gradio_unless_compact_sets_them(monkeypatch):
    options = _launch_options(monkeypatch)
    assert "server_name" not in options and "server_port" not in options
    options = _launch_options(monkeypatch, COMPACT_HOST="0.0.0.0", COMPACT_PORT="8001")
    assert options["server_name"] == "0.0.0.0" and options["server_port"] == 8001


def _front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    block = text.split("---\n")[1]
    return dict(line.split(": ", 1) for line in block.strip().splitlines())


def test_space_front_matter_and_dockerfile_agree():
    meta = _front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    docker = (ROOT / "Dockerfile").read_text()
    assert "GRADIO_SERVER_NAME=0.0.0.0" in docker and "COMPACT_HOST=" not in docker
    assert 'CMD ["python", "app.py"]' in docker and "EXPOSE 7860" in docker
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert meta["sdk_version"] == pins["gradio"]  # the Space runs the Gradio we test with
    assert meta["python_version"].strip('"') in docker  # FROM python:3.11-slim


@pytest.mark.app
def test_the_app_answers_on_gradios_port(tmp_path):
    """ui.server.serve starts app.py with GRADIO_SERVER_NAME / GRADIO_SERVER_PORT only."""
    from ui.server import serve

    with serve(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":7860/")
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            assert r.status == 200


def _context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


@pytest.mark.app
def test_an_idle_server_wakes_rarely(tmp_path):
    """Gradio's free queue looks for work every millisecond: about 860 wake-ups a second, which
    take the cores from the workers beside it. ui.app.calm_queue brings that to about 60."""
    from ui.server import serve

    with serve(tmp_path):
        server = max((p for p in psutil.Process().children() if "app.py" in p.cmdline()),
                     key=lambda p: p.create_time())
        time.sleep(2)  # past the first page's requests
        before = _context_switches(server.pid)
        time.sleep(5)
        per_s = (_context_switches(server.pid) - before) / 5
    assert per_s < 250, per_s
