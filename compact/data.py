"""Text sources turned into token blocks for calibration, training and validation.

SRC is "builtin", a .txt/.jsonl path, "hf:NAME[:CONFIG][:SPLIT]" or "teacher". Each source
becomes one token stream that is cut by position into three regions that never overlap:
training (first 80%), calibration (next 10%) and validation (last 10%). Blocks are
non-overlapping windows of a region, shuffled by a seed, so a given (source, split, seq_len,
seed) always yields the same blocks.

A fourth split, "heldout" (the workshop challenge's ranking, compact.leaderboard), is text that is
not in the stream at all, so the three regions above and every number made on them stay as they
were: for builtin, the standard library's docstrings of 200 to 399 characters (the stream takes
those of 400 or more); for hf:, the documents that follow the stream's character budget. A file
or teacher source has no such text and refuses the split.

builtin: the Python Language Reference topics (pydoc_data) and the longer docstrings of the
standard library: English prose written by Python's contributors, shipped with every
CPython, under the PSF License 2.0. About 325k tokens with SmolLM2's tokenizer.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from compact.errors import UserError
from compact.paths import cache_dir

SPLITS = {"train": (0.0, 0.8), "calibration": (0.8, 0.9), "validation": (0.9, 1.0)}
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo",
             "ensurepip", "__pycache__", "dist-packages"}
HF_CHAR_BUDGET = 20_000_000  # stop streaming a Hub dataset after this much text
HF_HELDOUT_CHARS = 2_000_000  # the held-out text of a Hub dataset: this much after the stream's
HELDOUT = "heldout"
# Docstrings of at least this many characters join the builtin stream; shorter ones down to
# HELDOUT_MIN_CHARS are the builtin held-out text.
DOC_MIN_CHARS, HELDOUT_MIN_CHARS = 400, 200
TEACHER_OPENINGS = [
    "The history of", "In the morning, she", "Scientists have discovered", "Here is a recipe for",
    "The main reason why", "Once upon a time,", "To solve this problem, we", "The city of",
    "A good teacher", "The following story", "Yesterday I learned", "The best way to learn",
    "In computer science,", "The weather today", "My favorite book", "When the war ended,",
]


def builtin_texts() -> list[str]:
    """The builtin corpus as documents, in a fixed order."""
    import pydoc_data.topics as topics

    docs = [topics.topics[k] for k in sorted(topics.topics)]
    return docs + [d for d in _stdlib_docstrings() if len(d) >= DOC_MIN_CHARS]


def builtin_heldout_texts() -> list[str]:
    """The builtin held-out text: docstrings too short for the corpus, in the same file order."""
    return [d for d in _stdlib_docstrings() if len(d) < DOC_MIN_CHARS]


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[str, ...]:
    """Every standard-library docstring of HELDOUT_MIN_CHARS or more, in file order (one parse
    of the library serves the corpus and its held-out text). Parsing the library took about 6 s
    here, paid by every worker process and command: the result is kept on disk, per Python
    build and library folder (the same install parses to the same text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{sys.version}|{stdlib}|{DOC_MIN_CHARS}|{HELDOUT_MIN_CHARS}|{sorted(SKIP_DIRS)}"
                       .encode()).hexdigest()[:16]
    path = None
    try:
        path = cache_dir("builtin") / f"docstrings-{key}.json"
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    docs = _parse_docstrings(stdlib)
    if path is not None:
        part = path.with_name(f"{path.name}.{os.getpid()}.part")  # whole or absent, with workers racing
        try:
            part.write_text(json.dumps(docs), encoding="utf-8")
            part.replace(path)
        except OSError:  # a cache that cannot be written costs time, nothing else
            pass
    return tuple(docs)


def _parse_docstrings(stdlib: Path) -> list[str]:
    docs = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(root, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= HELDOUT_MIN_CHARS:
                        docs.append(doc)
    return docs


def _read_text_file(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path} looks binary, not text")
    return raw


def file_texts(path: Path) -> list[str]:
    raw = _read_text_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path} line {n} has no 'text' string field")
            docs.append(row["text"])
    else:
        docs = [d for d in text.split("\n\n") if d.strip()]
    if not any(d.strip() for d in docs):
        raise UserError(f"{path} holds no text")
    return docs


def hf_texts(spec: str, heldout: bool = False) -> list[str]:
    """hf:NAME[:CONFIG][:SPLIT] through datasets, streamed so large sets are not downloaded.

    heldout: the documents after the stream's HF_CHAR_BUDGET instead, HF_HELDOUT_CHARS of them.
    """
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise UserError("hf source needs a name: hf:NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 and parts[2] else "train")
    try:
        import datasets

        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        docs, chars = [], 0
        budget = HF_CHAR_BUDGET + (HF_HELDOUT_CHARS if heldout else 0)
        for row in stream:
            text = row.get("text") if isinstance(row, dict) else None
            if text is None:
                raise UserError(f"dataset {name} has no 'text' column")
            if text.strip():
                if not heldout or chars >= HF_CHAR_BUDGET:  # past the stream's documents
                    docs.append(text)
                chars += len(text)
            if chars >= budget:
                break
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for an unreachable hub
        raise UserError(f"cannot stream dataset '{name}' from the Hub ({type(e).__name__}); "
                        "offline choices: builtin, a .txt or .jsonl file, teacher") from None
    if not docs:
        raise UserError(f"dataset '{name}' gave no text")
    return docs


# How much text the `teacher` source generates: 64 documents of 256 new tokens.
TEACHER_DOCS, TEACHER_NEW_TOKENS = 64, 256


def teacher_texts(model, tokenizer, n_docs: int | None = None, new_tokens: int | None = None, seed: int = 0,
                  progress=None) -> list[str]:
    """Text sampled from the model itself from varied openings, cached on disk.

    Generating takes minutes on a CPU, so progress(fraction, message) hears of every batch."""
    n_docs, new_tokens = n_docs or TEACHER_DOCS, new_tokens or TEACHER_NEW_TOKENS
    key = hashlib.sha256()
    for p in list(model.parameters())[:4]:
        key.update(p.detach().float().cpu().numpy().tobytes()[:4096])
    key.update(f"{n_docs}-{new_tokens}-{seed}".encode())
    path = cache_dir("teacher") / f"{key.hexdigest()[:16]}.jsonl"
    if path.exists():
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    docs = []
    for i in range(0, n_docs, 8):
        if progress is not None:
            progress(i / n_docs, f"generating teacher text: {i} of {n_docs} documents")
        prompts = [TEACHER_OPENINGS[(i + j) % len(TEACHER_OPENINGS)] for j in range(min(8, n_docs - i))]
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=True, top_p=0.95,
                                 temperature=1.0, pad_token_id=tokenizer.pad_token_id)
        docs += tokenizer.batch_decode(out, skip_special_tokens=True)
    if progress is not None:
        progress(1.0, f"generated teacher text: {n_docs} documents")
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return docs


def texts(src: str, model=None, tokenizer=None, progress=None) -> list[str]:
    src = (src or "").strip()
    if src == "builtin":
        return builtin_texts()
    if src == "teacher":
        if model is None:
            raise UserError("the 'teacher' source needs a loaded model")
        return teacher_texts(model, tokenizer, progress=progress)
    if src.startswith("hf:"):
        return hf_texts(src)
    path = Path(src).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if path.suffix not in (".txt", ".jsonl"):
            raise UserError(f"{path}: data files must be .txt or .jsonl")
        return file_texts(path)
    raise UserError(f"unknown data source '{src}': use builtin, a .txt/.jsonl file, "
                    "hf:NAME[:CONFIG][:SPLIT] or teacher")


@lru_cache(maxsize=8)
def _stream_cached(src: str, tokenizer) -> torch.Tensor:
    # Only for sources that cannot change under us within a process (builtin, hf:).
    return _encode(texts(src), tokenizer)


ENCODE_BATCH = 256


def _encode(docs: list[str], tokenizer) -> torch.Tensor:
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    # Batches of documents: a fast tokenizer encodes a batch in parallel (the builtin corpus in
    # 0.5 s instead of 1.1 s on 2 cores); bounded, as a batch's encodings are held at once.
    for start in range(0, len(docs), ENCODE_BATCH):
        for doc in tokenizer(docs[start:start + ENCODE_BATCH], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            if sep is not None:
                ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def token_stream(src: str, tokenizer, model=None, progress=None) -> torch.Tensor:
    """All tokens of a source in order, documents separated by the EOS token."""
    src = (src or "").strip()
    if src == "builtin" or src.startswith("hf:"):
        return _stream_cached(src, tokenizer)
    return _encode(texts(src, model, tokenizer, progress), tokenizer)


@lru_cache(maxsize=8)
def heldout_stream(src: str, tokenizer) -> torch.Tensor:
    """The held-out tokens of a source: text that no other split holds (see the module's note)."""
    src = (src or "").strip()
    if src == "builtin":
        return _encode(builtin_heldout_texts(), tokenizer)
    if src.startswith("hf:"):
        return _encode(hf_texts(src, heldout=True), tokenizer)
    raise UserError(f"'{src}' has no held-out text: the {HELDOUT} split exists for builtin and hf: "
                    "sources, whose held-out text lies outside the stream the other splits share")


def split_region(stream: torch.Tensor, split: str) -> torch.Tensor:
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use {', '.join([*SPLITS, HELDOUT])}")
    lo, hi = SPLITS[split]
    n = len(stream)
    return stream[int(n * lo): int(n * hi)]


# The blocks are held in memory as int64: this bounds one request to 2 GiB of token ids, far
# beyond any run this tool is for, so an absurd budget is refused instead of exhausting memory.
MAX_TOKENS = 2**28


def blocks(src: str, tokenizer, split: str, n_blocks: int | None, seq_len: int,
           seed: int = 0, model=None, progress=None) -> torch.Tensor:
    """n_blocks token blocks of seq_len from one split, shuffled by seed.

    The validation and held-out splits are never repeated: asking for more than one holds
    returns all of it. Training and calibration wrap around with a new shuffle per pass, for
    long runs on a small corpus. progress(fraction, message) hears how the `teacher` source's
    generation goes.
    """
    if seq_len < 2:
        raise UserError("sequence length must be at least 2")
    if n_blocks is not None and n_blocks * seq_len > MAX_TOKENS:
        raise UserError(f"{n_blocks * seq_len:,} tokens are more than one run may ask for "
                        f"(at most {MAX_TOKENS:,})")
    if split == HELDOUT:
        region = heldout_stream((src or "").strip(), tokenizer)
    else:
        region = split_region(token_stream(src, tokenizer, model, progress), split)
    available = len(region) // seq_len
    if available == 0:
        raise UserError(f"the {split} split of '{src}' holds {len(region)} tokens, "
                        f"fewer than one block of {seq_len}")
    windows = region[: available * seq_len].view(available, seq_len)
    if n_blocks is None:
        n_blocks = available
    if n_blocks <= 0:
        raise UserError("the number of blocks (or tokens) must be positive")
    gen = torch.Generator().manual_seed(seed)
    if split in ("validation", HELDOUT):
        return windows[torch.randperm(available, generator=gen)[: min(n_blocks, available)]]
    order = torch.cat([torch.randperm(available, generator=gen)
                       for _ in range(-(-n_blocks // available))])[:n_blocks]
    return windows[order]


def n_blocks_for(tokens: int, seq_len: int) -> int:
    if tokens <= 0:
        raise UserError("the token budget must be positive")
    return max(1, tokens // seq_len)
