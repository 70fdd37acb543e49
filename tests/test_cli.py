import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compact import runs
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.cli


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_info_on_tiny_checkpoint(tiny_checkpoint):
    proc = run_cli("info", "--model", str(tiny_checkpoint("qwen3")))
    assert proc.returncode == 0, proc.stderr
    info = _last_json(proc)
    assert info["family"] == "qwen3" and info["layers"] == 4 and info["kv_heads"] == 2


@pytest.mark.slow
def test_eval_prints_finite_perplexity(tiny_checkpoint):
    proc = run_cli("eval", "--model", str(tiny_checkpoint("gpt2")), "--data", "builtin",
                   "--tokens", "1024", "--seq-len", "64")
    assert proc.returncode == 0, proc.stderr
    out = _last_json(proc)
    assert out["tokens"] == 1024 and 1.0 < out["ppl"] < 1e6


@pytest.mark.slow
def test_generate_default_names_paris():
    proc = run_cli("generate", "--model", "default", "--prompt", "The capital of France is",
                   "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in _last_json(proc)["text"]


LOADS_DEFAULT = pytest.mark.slow  # these error cases load the real default model first


@pytest.mark.parametrize("args,message", [
    (["info", "--model", "./missing-folder"], "not a folder"),
    (["info", "--model", "some-org/some-model"], "Hugging Face Hub"),
    pytest.param(["eval", "--model", "default", "--data", "nope.txt"], "data file not found",
                 marks=LOADS_DEFAULT),
    pytest.param(["generate", "--model", "default", "--prompt", ""], "prompt is empty", marks=LOADS_DEFAULT),
    pytest.param(["generate", "--model", "default", "--prompt", "hi", "--max-new-tokens", "-3"],
                 "max new tokens", marks=LOADS_DEFAULT),
    (["info"], "--model"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_exit_2_with_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr


def test_empty_and_binary_data_files(tmp_path, tiny_checkpoint):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)))
    for path, message in ((empty, "holds no text"), (binary, "looks binary")):
        proc = run_cli("eval", "--model", str(tiny_checkpoint("llama")), "--data", str(path))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_longer_than_context(tiny_checkpoint):
    proc = run_cli("generate", "--model", str(tiny_checkpoint("llama")), "--prompt", "word " * 400)
    assert proc.returncode == 2 and "exceeds the model's context of 256" in proc.stderr


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_events_file_follows_a_training_run(tmp_path, tiny_checkpoint):
    """COMPACT_EVENTS: one JSON line per progress report and event, then the result; with
    COMPACT_RUN_ID the caller records the run, so the job records none."""
    ckpt = str(tiny_checkpoint("llama"))
    events = tmp_path / "events.jsonl"
    env = {"COMPACT_EVENTS": str(events), "COMPACT_RUN_ID": "7",
           "COMPACT_RUNS_DB": str(tmp_path / "r.sqlite")}
    proc = run_cli("distill", "--teacher", ckpt, "--student", ckpt, "--out", str(tmp_path / "d"),
                   "--tokens", "256", "--seq-len", "32", "--batch", "2", "--eval-tokens", "64", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = _events(events)
    assert rows[0]["type"] == "start" and rows[0]["command"] == "distill"
    steps = [r["event"] for r in rows if r["type"] == "event" and r["event"]["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [r["fraction"] for r in rows if r["type"] == "progress"][-1] == 1.0
    assert rows[-1] == {"type": "done", "result": _last_json(proc)}
    assert runs.RunStore(tmp_path / "r.sqlite").list() == []


def test_events_file_ends_with_the_user_error(tmp_path, tiny_checkpoint):
    events = tmp_path / "events.jsonl"
    proc = run_cli("eval", "--model", str(tiny_checkpoint("llama")), "--data", str(tmp_path / "none.txt"),
                   env={"COMPACT_EVENTS": str(events), "COMPACT_RUNS_DB": str(tmp_path / "r.sqlite")})
    assert proc.returncode == 2
    end = _events(events)[-1]
    assert end["type"] == "error" and end["error"] == "UserError" and "not found" in end["message"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_ends_the_stream_cancelled(tmp_path, tiny_checkpoint):
    """What the app's Cancel does to a worker: SIGTERM, a checkpoint, the result, exit 0."""
    ckpt = str(tiny_checkpoint("llama"))
    events, out = tmp_path / "events.jsonl", tmp_path / "d"
    env = {**os.environ, "COMPACT_EVENTS": str(events), "COMPACT_RUNS_DB": str(tmp_path / "r.sqlite")}
    proc = subprocess.Popen([sys.executable, "-m", "compact", "distill", "--teacher", ckpt, "--student", ckpt,
                             "--out", str(out), "--tokens", str(32 * 2 * 5000), "--seq-len", "32", "--batch",
                             "2", "--eval-tokens", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (events.exists() and '"kind": "step"' in events.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    end = _events(events)[-1]
    assert end["type"] == "cancelled" and end["result"]["status"] == "cancelled"
    assert end["result"] == json.loads(stdout.strip().splitlines()[-1])
    assert (out / "checkpoint" / "progress.json").is_file()
