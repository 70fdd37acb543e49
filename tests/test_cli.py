import json

import pytest

from tests.helpers import run_cli

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
