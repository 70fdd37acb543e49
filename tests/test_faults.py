"""Faults the app survives: a job out of memory, and a server restart.

One real server (ui/server.py) runs importance (succeeds) and a distillation whose batch
really asks for far more memory than the machine has (the CPU allocator refuses it at once:
~150 GB of activations, nothing is mocked). The job is recorded as failed with the reason and
the server keeps serving. The server is then stopped and started again on the same data: the
same session lists both runs, the artifact intact; another session sees none of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from compact import runs
from tests.helpers import FAST_SCORES
from ui.server import serve

pytestmark = [pytest.mark.app, pytest.mark.slow]

HUGE_BATCH = 2**20  # x 64 tokens x 576 channels x 4 bytes: 154 GB for one activation


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_out_of_memory_then_restart_keeps_every_run(tmp_path):
    with serve(tmp_path, env=FAST_SCORES) as url:
        client = Client(url, verbose=False)
        client.predict("default", api_name="/load")
        *_, summary, status = client.predict(None, "builtin", 2, 32, "l2", "mean", False,
                                             api_name="/importance")
        # the message names the file as the pickers do; it lies in this session's folder
        [scores] = tmp_path.rglob(status.split("**")[1])
        before = digest(scores)
        with pytest.raises(AppError, match="out of memory in distill .*lower the batch") as err:
            client.predict("default", "default", "builtin", HUGE_BATCH * 64, 64, HUGE_BATCH, 1e-4, 1.0, 1.0,
                           0.0, 0.0, False, api_name="/distill")
        assert "internal error" not in str(err.value)
        # still serving, and a model job runs after the failure
        text, speed = client.predict("default", "The capital of France is", 4, 0, 0, False,
                                     api_name="/generate")
        assert "Paris" in text
        rows = runs.RunStore(tmp_path / "runs.sqlite").list()
        assert [(r["kind"], r["status"]) for r in rows] == [("distill", "failed"),
                                                            ("importance", "succeeded")]
        assert rows[0]["error"].startswith("OutOfMemory: out of memory in distill")
        assert "can't allocate memory" in rows[0]["error"] or "CUDA out of memory" in rows[0]["error"]
        session = client.session_hash

    with serve(tmp_path, env=FAST_SCORES) as url:  # a restart on the same data folder and runs store
        same = Client(url, verbose=False)
        same.session_hash = session
        table = same.predict(api_name="/runs")
        listed = {r[table["headers"].index("kind")]: dict(zip(table["headers"], r, strict=True))
                  for r in table["data"]}
        assert set(listed) == {"importance", "distill"}
        assert listed["importance"]["status"] == "succeeded" and listed["importance"]["artifact_exists"]
        assert listed["importance"]["artifact"] == str(scores) and digest(scores) == before
        assert listed["distill"]["status"] == "failed" and "out of memory" in listed["distill"]["error"]
        other = Client(url, verbose=False)  # another visitor sees none of this session's runs
        assert other.predict(api_name="/runs")["data"] == []
