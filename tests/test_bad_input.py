"""Bad input, CLI and app: each a clear one-line message, the server still serving, the runs
store unchanged.

The app side drives the real server (ui/server.py) through gradio_client; its data
folder holds the bad files, since a visitor may only name paths inside the allowed folders.
CLI cases already covered in test_cli/test_models/test_data are not repeated here.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from transformers import BertConfig, BertForMaskedLM

from compact import runs
from tests.helpers import FAST_SCORES, run_cli
from ui.server import free_port, serve

UPLOAD_LIMIT_MB = 1


def write_bad_files(root: Path, good: Path) -> dict[str, Path]:
    """Every bad file or folder, by case name; `good` is a tiny llama checkpoint to corrupt."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}

    def folder(name: str, copy: tuple[str, ...] = ("config.json", "tokenizer.json", "tokenizer_config.json")):
        path = root / name
        path.mkdir()
        for f in copy:
            (path / f).write_bytes((good / f).read_bytes())
        paths[name] = path
        return path

    folder("no-weights")
    corrupt = folder("corrupt-safetensors")
    (corrupt / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:300])
    paths["corrupt.gguf"] = root / "corrupt.gguf"
    paths["corrupt.gguf"].write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(200))
    bert = root / "bert"
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(bert)
    paths["bert"] = bert
    remote = root / "remote-code"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(
        {"model_type": "custom-thing", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                    "AutoModelForCausalLM": "modeling_x.XModel"}}))
    (remote / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    paths["remote-code"] = remote
    for name, content in (("empty.txt", b""), ("binary.txt", bytes(range(256)) * 8),
                          ("latin1.txt", "café crème brûlée\n".encode("latin-1") * 20),
                          ("notext.jsonl", b'{"body": "hello"}\n{"body": "world"}\n')):
        paths[name] = root / name
        paths[name].write_bytes(content)
    paths["big.txt"] = root / "big.txt"
    paths["big.txt"].write_text("lorem ipsum dolor sit amet\n" * (UPLOAD_LIMIT_MB * 2**20 // 27 + 2000))
    paths["good.txt"] = root / "good.txt"
    paths["good.txt"].write_text("The quick brown fox jumps over the lazy dog.\n\n" * 50)
    paths["weights.exe"] = root / "weights.exe"
    paths["weights.exe"].write_bytes(b"MZ" + bytes(100))
    return paths


def count_runs(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("bad-input-app")
    files = write_bad_files(tmp / "data" / "bad", tiny_checkpoint("llama"))
    old = os.environ.get("COMPACT_MAX_UPLOAD_MB")
    os.environ["COMPACT_MAX_UPLOAD_MB"] = str(UPLOAD_LIMIT_MB)
    try:
        with serve(tmp, env=FAST_SCORES) as url:
            client = Client(url, verbose=False)
            client.predict("default", api_name="/load")  # the session's model, loaded once
            yield {"client": client, "files": files, "db": tmp / "runs.sqlite", "tmp": tmp, "url": url}
    finally:
        if old is None:
            os.environ.pop("COMPACT_MAX_UPLOAD_MB", None)
        else:
            os.environ["COMPACT_MAX_UPLOAD_MB"] = old


def importance_args(src: str) -> tuple:
    return (None, src, 2, 32, "l2", "mean", False)


# (case, api, args built from the bad files, message the visitor reads)
APP_CASES = [
    ("unknown hub id", "/load", lambda f: ("nobody-xyz/no-such-model-123",),
     "Hugging Face Hub"),
    ("folder without weights", "/load", lambda f: (str(f["no-weights"]),), "no weights|no .*safetensors"),
    ("corrupt safetensors", "/load", lambda f: (str(f["corrupt-safetensors"]),), "cannot load .*header"),
    ("corrupt gguf", "/load", lambda f: (str(f["corrupt.gguf"]),), "cannot read GGUF"),
    ("encoder-only model", "/load", lambda f: (str(f["bert"]),), "unsupported architecture 'bert'"),
    ("remote code", "/load", lambda f: (str(f["remote-code"]),), "remote code|cannot read the config"),
    ("model outside the allowed folders", "/load", lambda f: ("/usr/lib",), "outside the folders"),
    ("empty text file", "/importance", lambda f: importance_args(str(f["empty.txt"])), "holds no text"),
    ("binary text file", "/importance", lambda f: importance_args(str(f["binary.txt"])), "looks binary"),
    ("not UTF-8", "/importance", lambda f: importance_args(str(f["latin1.txt"])), "not UTF-8"),
    ("jsonl without text", "/importance", lambda f: importance_args(str(f["notext.jsonl"])),
     "no 'text' string field"),
    ("data outside the allowed folders", "/importance", lambda f: importance_args("/etc/hostname.txt"),
     "outside the folders"),
    ("data path escaping with ..", "/importance",
     lambda f: importance_args(str(f["good.txt"].parent / ".." / ".." / ".." / "x.txt")),
     "outside the folders"),
    ("negative samples", "/importance", lambda f: (None, "builtin", -4, 32, "l2", "mean", False),
     "less than minimum value 1"),
    ("layers 0", "/prune", lambda f: (0, 576, 1536, 9, "bi"), "less than minimum value 1"),
    ("ffn larger than the model's", "/prune", lambda f: (30, 576, 4096, 9, "bi"), "ffn|1536"),
    ("hidden larger than the model's", "/prune", lambda f: (30, 1024, 1536, 9, "bi"),
     "hidden|576"),
    ("prompt far beyond the context", "/generate",
     lambda f: ("default", "word " * 9000, 8, 0, 0, False), "exceeds the model's context"),
    ("negative token budget", "/generate", lambda f: ("default", "hi", -5, 0, 0, False),
     "less than minimum value 1"),
    ("absurd distill tokens", "/distill",
     lambda f: ("default", "default", "builtin", 10**15, 64, 2, 1e-4, 1.0, 1.0, 0.0, 0.0, False),
     "tokens are more than one run may ask for"),
    ("negative distill tokens", "/distill",
     lambda f: ("default", "default", "builtin", -64, 64, 2, 1e-4, 1.0, 1.0, 0.0, 0.0, False),
     "less than minimum value 1"),
]


@pytest.mark.parametrize("case,api,args,message", APP_CASES, ids=[c[0] for c in APP_CASES])
@pytest.mark.app
@pytest.mark.slow
def test_app_bad_input(server, case, api, args, message):
    client, db = server["client"], server["db"]
    before = count_runs(db)
    with pytest.raises(AppError, match=message) as err:
        client.predict(*args(server["files"]), api_name=api)
    text = str(err.value)
    assert "Traceback" not in text and "internal error" not in text and len(text.splitlines()) == 1
    assert count_runs(db) == before  # bad input leaves the store as it was
    # still serving: the session's model answers (cached, so this is quick)
    card, info = client.predict("default", api_name="/load")
    assert info["layers"] == 30


@pytest.mark.app
@pytest.mark.slow
def test_app_upload_over_the_limit_and_wrong_type(server):
    client, files, db = server["client"], server["files"], server["db"]
    before = count_runs(db)
    with pytest.raises(Exception, match="(?i)too large|maximum|exceeds|413") as big:
        client.predict(handle_file(str(files["big.txt"])), api_name="/upload_importance_data")
    assert "exceeds the maximum file size" in str(big.value)  # gradio_client checks first
    # and the server refuses it too, for a client that does not check
    with open(files["big.txt"], "rb") as fh:
        reply = httpx.post(server["url"] + "gradio_api/upload", files={"files": ("big.txt", fh)}, timeout=60)
    assert reply.status_code == 413 and "maximum allowed size" in reply.text
    with pytest.raises(AppError, match="Invalid file type|uploads must be .txt or .jsonl"):
        client.predict(handle_file(str(files["weights.exe"])), api_name="/upload_distill_data")
    with pytest.raises(AppError, match="looks binary"):
        client.predict(handle_file(str(files["binary.txt"])), api_name="/upload_importance_data")
    assert count_runs(db) == before
    # a good upload lands in the session's folder, inside the allowed folders, and is usable
    path = client.predict(handle_file(str(files["good.txt"])), api_name="/upload_importance_data")
    assert Path(path).is_file() and Path(path).is_relative_to(server["tmp"] / "data")
    *figures, summary, status = client.predict(*importance_args(path), api_name="/importance")
    assert summary["meta"]["samples"] == 2
    assert count_runs(db) == before + 1


@pytest.mark.app
@pytest.mark.slow
def test_app_two_jobs_never_share_an_output(server, monkeypatch):
    """The app names outputs itself and reserves each name as it hands it out."""
    monkeypatch.setenv("COMPACT_DATA", str(server["tmp"] / "reserve"))
    from compact import settings
    from ui import state as st
    monkeypatch.setattr(st, "SETTINGS", settings.load())
    a, b = st.next_output("s1", "pruned"), st.next_output("s1", "pruned")
    assert a != b and a.is_dir() and b.is_dir()
    imp = st.next_output("s1", "importance").with_suffix(".safetensors")
    imp.write_bytes(b"x")
    assert st.next_output("s1", "importance").with_suffix(".safetensors") != imp


# ---- CLI cases not covered elsewhere -------------------------------------------------------

def cli_error(*args: str, env: dict | None = None) -> str:
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, tiny_checkpoint):
    return write_bad_files(tmp_path_factory.mktemp("bad-input-cli"), tiny_checkpoint("llama"))


@pytest.mark.cli
@pytest.mark.slow
def test_cli_bad_inputs_leave_the_store_unchanged(tmp_path, cli_files, tiny_checkpoint):
    db = tmp_path / "runs.sqlite"
    env = {"COMPACT_RUNS_DB": str(db)}
    model = str(tiny_checkpoint("llama"))
    runs.RunStore(db)
    cases = [
        (("info", "--model", str(cli_files["corrupt-safetensors"])), "cannot load .*header"),
        (("eval", "--model", model, "--data", str(cli_files["latin1.txt"])), "not UTF-8"),
        (("eval", "--model", model, "--data", str(cli_files["notext.jsonl"])), "no 'text' string field"),
        (("eval", "--model", model, "--tokens", "-5"), "token budget must be positive"),
        (("eval", "--model", model, "--tokens", str(10**15)), "more than one run may ask for"),
        (("prune", "--model", model, "--out", str(tmp_path / "p"), "--layers", "0"), "layer"),
        (("prune", "--model", model, "--out", str(tmp_path / "p"), "--ffn", "100000"), "ffn|128"),
        (("prune", "--model", model, "--out", str(tmp_path / "p"), "--heads", "3"), "KV heads|multiple"),
        (("distill", "--teacher", model, "--student", model, "--out", str(tmp_path / "d"),
          "--tokens", "-100"), "token budget must be positive"),
    ]
    for args, message in cases:
        line = cli_error(*args, env=env)
        assert __import__("re").search(message, line), (args, line)
        assert count_runs(db) == 0, (args, line)


@pytest.mark.cli
def test_cli_hub_unreachable(tmp_path):
    """An endpoint nobody listens on: a fast, clear message instead of retries."""
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"}
    line = cli_error("info", "--model", "some-org/some-model", env=env)
    assert "cannot reach the Hugging Face Hub" in line


@pytest.mark.cli
def test_cli_two_jobs_writing_the_same_output(tmp_path, tiny_checkpoint):
    """A job still writing a folder (this live process holds the record) blocks a second one."""
    db = tmp_path / "runs.sqlite"
    out = tmp_path / "pruned"
    store = runs.RunStore(db)
    with runs.track("prune", "x", artifact=str(out), store=store):
        line = cli_error("prune", "--model", str(tiny_checkpoint("llama")), "--out", str(out),
                         "--layers", "2", env={"COMPACT_RUNS_DB": str(db)})
        assert "is still writing" in line and str(out) in line
        assert count_runs(db) == 1
    assert store.list()[0]["status"] == "succeeded" and not out.exists()
