"""Long jobs in worker processes (ui/lanes.py), driven through the real server.

A tiny Llama checkpoint and a small text inside the server's data folder keep the steps short.
One server for the module: a distillation runs in a child `python -m compact distill` process
and ends with the fields an in-process run gave; Cancel makes the worker save a checkpoint and
resuming that run finishes it with every step once; a worker killed with SIGKILL leaves its run
failed with the reason while the server answers /generate. Then a restart: the server stops
during a distillation, the next one shows the run interrupted and resumes it to its end.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from compact import models, runs
from tests.helpers import calib_text
from ui.server import serve

pytestmark = [pytest.mark.app, pytest.mark.slow]

SEQ, BATCH = 32, 2
# What an in-process distillation returned (compact.distill._finish), and a cancelled one besides.
RESULT_FIELDS = {"status", "steps", "total_steps", "tokens", "loss", "kd", "ce", "hidden", "val_loss_before",
                 "val_ppl_before", "val_loss_after", "val_ppl_after", "teacher_val_loss", "teacher_val_ppl",
                 "tokens_per_s", "train_seconds", "out", "device", "processes",
                 "params",  # the student's parameter count (lineage)
                 "canonical"}  # the workspace's scores of the student before and after (the app asks)


def prepare(folder: Path, make_model, tokenizer) -> dict:
    """A data folder holding a tiny model and a small text, as visitors' files would be."""
    data = folder / "data"
    models.save(make_model("llama"), tokenizer, data / "models" / "tiny", {"source": "test"})
    return {"root": folder, "db": folder / "runs.sqlite", "model": str(data / "models" / "tiny"),
            "text": str(calib_text(data))}


def distill_args(files: dict, steps: int) -> tuple:
    model = files["model"]
    return (model, model, files["text"], SEQ * BATCH * steps, SEQ, BATCH, 1e-3, 1.0, 1.0, 0.1, 0.0, False)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_for(what, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = what()
        if found:
            return found
        time.sleep(every)
    pytest.fail(f"timed out waiting for {getattr(what, '__name__', 'a condition')}")


def running_worker(db: Path, kind: str = "distill") -> dict:
    """The running run of `kind` once its worker process is up (its pid recorded)."""
    def worker():
        for r in runs.RunStore(db).list(kind=kind, status="running"):
            try:
                if cmdline(r["pid"])[1:4] == ["-m", "compact", kind]:
                    return r
            except OSError:
                continue
        return None
    return wait_for(worker)


def steps_written(out: str) -> list[int]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_model, tokenizer):
    files = prepare(tmp_path_factory.mktemp("lanes"), make_model, tokenizer)
    with serve(files["root"]) as url:
        yield {**files, "client": Client(url, verbose=False)}


def test_distillation_runs_in_a_worker_process(server):
    client, db = server["client"], server["db"]
    job = client.submit(*distill_args(server, 3), api_name="/distill")
    row = running_worker(db)
    pid = row["pid"]
    assert cmdline(pid)[1:4] == ["-m", "compact", "distill"]  # python -m compact distill ...
    assert "--teacher" in cmdline(pid) and server["model"] in cmdline(pid)
    assert cmdline(parent(pid))[-1] == "app.py"  # a child of the server, not the server itself
    loss, message, result = job.result(timeout=600)
    assert set(result) == RESULT_FIELDS
    assert result["status"] == "done" and result["steps"] == result["total_steps"] == 3
    assert result["tokens"] == 3 * SEQ * BATCH and result["canonical"]["ppl_after"] > 1
    assert (Path(result["out"]) / "model.safetensors").is_file() and message.startswith("Done: 3 steps")
    # the worker's events reached the tab as they came: a status line and the loss plot per step
    live = [o for o in job.outputs() if isinstance(o[1], str) and o[1].startswith("step ")]
    assert [o[1].split(" ")[1] for o in live] == ["1/3", "2/3", "3/3"] and all(o[0] for o in live)
    recorded = runs.RunStore(db).get(row["id"])
    assert recorded["status"] == "succeeded" and recorded["pid"] == pid and recorded["session"]
    assert recorded["metrics"]["ppl"] == result["canonical"]["ppl_after"]
    assert recorded["metrics"]["setting"] == result["canonical"]["setting"]
    assert not alive(pid)


def test_cancel_checkpoints_and_resume_finishes_the_run(server):
    client, db = server["client"], server["db"]
    job = client.submit(*distill_args(server, 12), api_name="/distill")
    row = running_worker(db)
    wait_for(lambda: steps_written(row["artifact"]))
    assert client.predict(api_name="/cancel").startswith("Stopping")
    loss, message, result = job.result(timeout=600)
    assert result["status"] == "cancelled" and "Resume" in message
    assert (Path(result["checkpoint"]) / "progress.json").is_file()
    assert runs.RunStore(db).get(row["id"])["status"] == "cancelled"
    stopped_at = result["steps"]
    assert 1 <= stopped_at < 12
    # The tab offers the run: resuming the newest resumable run continues it from its checkpoint.
    loss, message, resumed = client.predict(None, api_name="/distill_resume")
    assert resumed["status"] == "done" and resumed["steps"] == 12 and resumed["out"] == result["out"]
    assert steps_written(result["out"]) == list(range(1, 13))  # each step once
    assert not (Path(result["out"]) / "checkpoint").exists()
    with pytest.raises(AppError, match="no interrupted or cancelled distill run"):
        client.predict(None, api_name="/distill_resume")


def test_killed_worker_fails_the_run_and_the_server_serves_on(server):
    client, db = server["client"], server["db"]
    job = client.submit(*distill_args(server, 5000), api_name="/distill")
    row = running_worker(db)
    os.kill(row["pid"], signal.SIGKILL)
    with pytest.raises(AppError, match="distill worker .* was killed by SIGKILL") as err:
        job.result(timeout=300)
    assert "internal error" not in str(err.value)
    recorded = runs.RunStore(db).get(row["id"])
    assert recorded["status"] == "failed" and "SIGKILL" in recorded["error"]
    text, speed = client.predict("default", "The capital of France is", 4, 0, 0, False, api_name="/generate")
    assert "Paris" in text


def test_restart_shows_the_run_interrupted_and_resume_finishes_it(tmp_path, make_model, tokenizer):
    files = prepare(tmp_path, make_model, tokenizer)
    with serve(tmp_path) as url:
        client = Client(url, verbose=False)
        client.submit(*distill_args(files, 12), api_name="/distill")
        row = running_worker(files["db"])
        wait_for(lambda: steps_written(row["artifact"]))
        session = client.session_hash
    # The server is gone: its worker stops at the next step, saves a checkpoint and ends.
    wait_for(lambda: not alive(row["pid"]), timeout=120)
    with serve(tmp_path) as url:
        same = Client(url, verbose=False)
        same.session_hash = session
        table = same.predict(api_name="/runs")
        listed = [dict(zip(table["headers"], r, strict=True)) for r in table["data"]]
        assert [(r["id"], r["kind"], r["status"]) for r in listed] == [(row["id"], "distill", "interrupted")]
        assert "server stopped" in listed[0]["error"] and "checkpoint" in listed[0]["error"]
        stopped_at = max(steps_written(row["artifact"]))
        assert stopped_at < 12
        loss, message, result = same.predict(None, api_name="/distill_resume")
        assert result["status"] == "done" and result["steps"] == 12 and result["out"] == row["artifact"]
        assert steps_written(row["artifact"]) == list(range(1, 13))
        statuses = [r["status"] for r in runs.RunStore(files["db"]).list(kind="distill")]
        assert statuses == ["succeeded", "interrupted"]


def test_workers_share_the_cores_by_how_many_run(tmp_path, make_model, tokenizer):
    from compact.hardware import cpu_threads

    alone, two = cpu_threads(1), cpu_threads(2)
    if alone == two:
        pytest.skip("one core: every worker has one thread however many run")
    files = prepare(tmp_path, make_model, tokenizer)
    # Without OMP_NUM_THREADS (the tests set one for every process they start), as a server runs.
    with serve(tmp_path, env={"OMP_NUM_THREADS": None, "COMPACT_WORKERS": "2"}) as url:
        first, second = Client(url, verbose=False), Client(url, verbose=False)  # two visitors
        job = first.submit(*distill_args(files, 5000), api_name="/distill")
        row = running_worker(files["db"])
        log = wait_for(lambda: next((tmp_path / "data").glob(f"*/job-{row['id']}.log"), None))
        threads = log.with_suffix(".threads")
        environ = Path(f"/proc/{row['pid']}/environ").read_text().split("\0")
        assert f"OMP_NUM_THREADS={alone}" in environ
        # Niced in the server's session (autogroups weigh nice only within one), in a process
        # group of its own (the terminal's Ctrl-C goes to the server's group only).
        server = int(next(v.split("=", 1)[1] for v in environ if v.startswith("COMPACT_PARENT_PID=")))
        assert os.getsid(row["pid"]) == os.getsid(server)
        assert os.getpgid(row["pid"]) == row["pid"] != os.getpgid(server)
        assert os.getpriority(os.PRIO_PROCESS, row["pid"]) > os.getpriority(os.PRIO_PROCESS, server)
        second.predict(*distill_args(files, 3), api_name="/distill")  # alongside, to its end
        changes = lambda: [line.split()[2] for line in log.read_text().splitlines()  # noqa: E731
                           if line.startswith("CPU threads:")]
        # the first worker took its share while the second ran, then every core again
        wait_for(lambda: changes() == [str(two), str(alone)], timeout=120)
        assert threads.read_text() == str(alone)
        # A computing thread of the server counts too: while importance runs in the server, the
        # worker's file holds the smaller share. (Read from the file: the niced worker, on a busy
        # machine, may reach no safe point within the importance run.)
        importance = second.submit(files["model"], "builtin", 256, 64, "l2", "mean", True,
                                   api_name="/importance")
        wait_for(lambda: threads.read_text() == str(two), timeout=120, every=0.01)
        importance.result(timeout=300)
        wait_for(lambda: threads.read_text() == str(alone), timeout=30)
        assert first.predict(api_name="/cancel").startswith("Stopping")
        assert job.result(timeout=300)[2]["status"] == "cancelled"
        assert not threads.exists()
