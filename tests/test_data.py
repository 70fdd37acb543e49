import json

import pytest
import torch

from compact import data
from compact.errors import UserError


def _positions(region_start, blocks, stream):
    """Start offsets of each block inside the stream (blocks are exact windows)."""
    found = set()
    for row in blocks:
        for start in range(len(stream) - len(row) + 1):
            if torch.equal(stream[start:start + len(row)], row):
                found.add(start)
                break
    return found


def test_builtin_is_large_and_splits_never_overlap(tokenizer):
    stream = data.token_stream("builtin", tokenizer)
    outside_validation = (len(data.split_region(stream, "train"))
                          + len(data.split_region(stream, "calibration")))
    assert outside_validation >= 100_000
    # The three regions tile the stream exactly, in order.
    regions = [data.split_region(stream, s) for s in ("train", "calibration", "validation")]
    assert sum(len(r) for r in regions) == len(stream)
    assert torch.equal(torch.cat(regions), stream)


def test_builtin_corpus_is_parsed_once_then_read_from_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACT_HOME", str(tmp_path))
    data._stdlib_docstrings.cache_clear()
    try:
        parsed = data._stdlib_docstrings()
        [path] = (tmp_path / "builtin").glob("docstrings-*.json")
        assert tuple(json.loads(path.read_text())) == parsed and len(parsed) > 1000
        assert not list(path.parent.glob("*.part"))
        # A later process reads the file instead of parsing the library again...
        path.write_text(json.dumps(["a docstring from the file"]))
        data._stdlib_docstrings.cache_clear()
        assert data._stdlib_docstrings() == ("a docstring from the file",)
        # ...and a damaged file is parsed again and replaced.
        path.write_text("[")
        data._stdlib_docstrings.cache_clear()
        assert data._stdlib_docstrings() == parsed
        assert tuple(json.loads(path.read_text())) == parsed
        # A home where nothing can be written costs a parse, not the corpus.
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("COMPACT_HOME", str(tmp_path / "a-file" / "home"))
        data._stdlib_docstrings.cache_clear()
        assert data._stdlib_docstrings() == parsed
    finally:
        data._stdlib_docstrings.cache_clear()


def test_encoding_documents_in_batches_equals_one_by_one(tokenizer, monkeypatch):
    monkeypatch.setattr(data, "ENCODE_BATCH", 7)  # 52 documents: 7 full batches and a part
    docs = data.builtin_texts()[:50] + ["", "a short one"]
    ids = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert data._encode(docs, tokenizer).tolist() == ids
    assert data._encode([], tokenizer).tolist() == []


def test_blocks_deterministic_and_split_bound(tokenizer, tmp_path):
    text = " ".join(f"word{i} is number {i}." for i in range(3000))
    path = tmp_path / "c.txt"
    path.write_text(text)
    stream = data.token_stream(str(path), tokenizer)
    n = len(stream)
    val = data.blocks(str(path), tokenizer, "validation", 1000, 16, seed=1)
    train = data.blocks(str(path), tokenizer, "train", 50, 16, seed=1)
    calib = data.blocks(str(path), tokenizer, "calibration", 10, 16, seed=3)
    assert torch.equal(train, data.blocks(str(path), tokenizer, "train", 50, 16, seed=1))
    assert not torch.equal(train, data.blocks(str(path), tokenizer, "train", 50, 16, seed=2))
    assert len(val) == len(data.split_region(stream, "validation")) // 16
    # Every validation window lies in the last tenth; training and calibration windows before it.
    val_starts = _positions(0, val[:20], stream)
    assert val_starts and min(val_starts) >= int(n * 0.9)
    assert max(_positions(0, train[:20], stream)) + 16 <= int(n * 0.8)
    calib_starts = _positions(0, calib, stream)
    assert min(calib_starts) >= int(n * 0.8) and max(calib_starts) + 16 <= int(n * 0.9)


def test_validation_never_repeats_training_wraps(tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("alpha beta gamma delta " * 200)
    val = data.blocks(str(path), tokenizer, "validation", 10_000, 8)
    assert len(val) == len(data.split_region(data.token_stream(str(path), tokenizer), "validation")) // 8
    train = data.blocks(str(path), tokenizer, "train", 500, 8)
    assert len(train) == 500


def test_jsonl_source(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} says hello."}) for i in range(400)))
    assert data.blocks(str(path), tokenizer, "train", 4, 8).shape == (4, 8)


@pytest.mark.parametrize("content,suffix,message", [
    (b"", ".txt", "holds no text"),
    (b"   \n\n  ", ".txt", "holds no text"),
    (b"\x00\x01\x02binary", ".txt", "looks binary"),
    (b"caf\xe9 au lait", ".txt", "not UTF-8"),
    (b'{"content": "x"}\n', ".jsonl", "no 'text'"),
    (b"not json\n", ".jsonl", "not JSON"),
    (b"hello", ".csv", "must be .txt or .jsonl"),
])
def test_bad_files(tokenizer, tmp_path, content, suffix, message):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.blocks(str(path), tokenizer, "train", 1, 8)


@pytest.mark.slow
def test_unknown_and_missing_sources(tokenizer, tmp_path):
    with pytest.raises(UserError, match="unknown data source"):
        data.texts("nowhere")
    with pytest.raises(UserError, match="not found"):
        data.texts(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="needs a loaded model"):
        data.texts("teacher")
    with pytest.raises(UserError, match="from the Hub"):
        data.texts("hf:surely-not-a-dataset-name-xyz")


def test_bad_block_requests(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("short text")
    with pytest.raises(UserError, match="fewer than one block"):
        data.blocks(str(path), tokenizer, "validation", 1, 512)
    with pytest.raises(UserError, match="positive"):
        data.n_blocks_for(0, 16)
    with pytest.raises(UserError, match="unknown split"):
        data.blocks("builtin", tokenizer, "test", 1, 16)


def test_teacher_source_generates_and_caches(make_model, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPACT_HOME", str(tmp_path))
    model = make_model("llama")
    heard = []  # what a progress bar hears while the teacher generates: every batch, then done
    docs = data.teacher_texts(model, tokenizer, n_docs=12, new_tokens=16, progress=lambda *a: heard.append(a))
    assert len(docs) == 12 and all(docs)
    assert heard == [(0.0, "generating teacher text: 0 of 12 documents"),
                     (8 / 12, "generating teacher text: 8 of 12 documents"),
                     (1.0, "generated teacher text: 12 documents")]
    assert list((tmp_path / "teacher").glob("*.jsonl"))
    assert data.teacher_texts(model, tokenizer, n_docs=12, new_tokens=16) == docs


def test_teacher_progress_reaches_a_job_progress_bar(make_model, tokenizer, monkeypatch, tmp_path):
    """blocks() passes it on, and a job's event sink turns it into progress (inside an experiment arm too)."""
    from compact.train import data_progress, relay

    monkeypatch.setenv("COMPACT_HOME", str(tmp_path))
    monkeypatch.setattr(data, "TEACHER_NEW_TOKENS", 4)  # the real generation, shorter
    bar, events = [], []
    emit = relay(events.append, lambda f, m: bar.append((f, m)))
    data.blocks("teacher", tokenizer, "train", 1, 2, model=make_model("llama"), progress=data_progress(emit))
    assert [f for f, _ in bar] == [i / 8 for i in range(8)] + [1.0]  # 64 documents, 8 a batch
    assert events[1] == {"kind": "data", "fraction": 1 / 8,
                         "message": "generating teacher text: 8 of 64 documents"}
    emit({"kind": "arm", "arm": 2, "arms": 4, "name": "mlp"})
    data_progress(emit)(0.5, "half")
    assert bar[-1] == (0.375, "arm 2 of 4 (mlp): half")
