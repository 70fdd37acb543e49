"""One canonical evaluation per workspace, computed once per model and cached in the runs store.

Every tab used to score models on its own token count and sequence length, so the same model
showed four perplexities. Here one setting (validation source, tokens, block length: the
COMPACT_EVAL_* variables, shared by the server and its worker processes) scores every model on
the same blocks. A result is cached in the runs store under the model's identity and version
(a local folder or file changes version when its weights or config change), the setting, and
the place it was computed (device type and dtype: a bf16 GPU number is not a CPU fp32 one).
A number is always returned with its setting's label, so no perplexity goes unexplained.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from compact.errors import UserError
from compact.options import option

# The files whose change makes a local model another model.
_VERSIONED = (".safetensors", ".bin", ".gguf", ".pt")
_VERSIONED_NAMES = ("config.json",)
_locks: dict[tuple, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Setting:
    data: str = "builtin"
    tokens: int = 4096
    seq_len: int = 256
    split: str = "validation"  # "heldout": the workshop challenge's ranking (compact.leaderboard)

    @property
    def key(self) -> str:
        # The validation split's keys are the ones stores already hold.
        tail = "" if self.split == "validation" else f"|{self.split}"
        return f"{self.data}|{self.tokens}|{self.seq_len}{tail}"

    @property
    def label(self) -> str:
        return f"{self.data} {self.split}, {self.tokens:,} tokens in blocks of {self.seq_len}"


def canonical() -> Setting:
    """The workspace's setting: COMPACT_EVAL_DATA, COMPACT_EVAL_TOKENS, COMPACT_EVAL_SEQ_LEN."""
    default = Setting()
    try:
        tokens = int(os.environ.get("COMPACT_EVAL_TOKENS") or default.tokens)
        seq_len = int(os.environ.get("COMPACT_EVAL_SEQ_LEN") or default.seq_len)
    except ValueError:
        raise UserError("COMPACT_EVAL_TOKENS and COMPACT_EVAL_SEQ_LEN must be integers") from None
    if tokens < 1 or seq_len < 2:
        raise UserError("COMPACT_EVAL_TOKENS must be positive and COMPACT_EVAL_SEQ_LEN at least 2")
    return Setting(os.environ.get("COMPACT_EVAL_DATA") or default.data, tokens, seq_len)


@dataclass(kw_only=True)
class ScoreOptions:
    """Shared by the jobs that make a model."""

    score: bool = option(False, "score the input and the output model with the workspace's canonical "
                                "evaluation (COMPACT_EVAL_*; cached in the runs store)")


def identity(ref: str) -> tuple[str, str]:
    """(model, version): a local folder or file by its resolved path and a digest of its weight
    and config files' names, sizes and times; anything else ('default', a Hub id) by its name."""
    path = Path(ref).expanduser()
    if ref == "default" or not path.exists():
        return ref, ""
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.is_file() and (f.suffix in _VERSIONED or f.name in _VERSIONED_NAMES))
    digest = hashlib.sha1()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return str(path.resolve()), digest.hexdigest()[:16]


def _place(device, dtype) -> str:
    return f"{device.type}:{str(dtype).replace('torch.', '')}"


def _lock(key: tuple) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def cached(ref: str, setting: Setting | None = None, store=None, place: str | None = None) -> dict | None:
    """The cached score of ref (on this machine's default place unless given), or None."""
    from compact import models
    from compact.runs import RunStore

    setting = setting or canonical()
    if place is None:
        device = models.pick_device()
        place = _place(device, models.pick_dtype(device))
    model, version = identity(ref)
    hit = (store or RunStore()).evaluation(model, version, setting.key, place)
    return _result(hit, setting, True) if hit else None


def score(ref: str | None, loaded=None, setting: Setting | None = None, store=None, load=None,
          batch: int = 8) -> dict:
    """The perplexity of model ref under the setting (the canonical one by default), from the
    cache or computed now and cached. loaded: ref already loaded (else it is loaded with
    `load`, a compact.options.LoadOptions, or the defaults, only on a cache miss). ref None: the
    loaded model as it is in memory, scored and not cached."""
    from compact import models
    from compact.runs import RunStore

    setting = setting or canonical()
    if ref is None:  # a model only in memory (an experiment's unsaved arm): scored, not cached
        return _result(_measure(loaded, setting, batch), setting, False)
    store = store or RunStore()
    model_key, version = identity(ref)
    if loaded is not None:
        param = next(loaded.model.parameters())
        place = _place(param.device, param.dtype)
    else:
        device = models.pick_device(getattr(load, "device", None))
        place = _place(device, models.pick_dtype(device, getattr(load, "dtype", None)))
    key = (model_key, version, setting.key, place)
    with _lock(key):  # two users asking for the same model's score: one computes, one reads
        hit = store.evaluation(*key)
        if hit:
            return _result(hit, setting, True)
        if loaded is None:
            loaded = load.load(ref) if load is not None else models.load(ref)
        row = _measure(loaded, setting, batch)
        store.record_evaluation(*key, row["loss"], row["ppl"], row["tokens"], row["seconds"])
        return _result(row, setting, False)


def _measure(loaded, setting: Setting, batch: int) -> dict:
    from compact import data, evaluate

    seq = min(setting.seq_len, evaluate.context_length(loaded.model))
    blocks = data.blocks(setting.data, loaded.tokenizer, setting.split,
                         data.n_blocks_for(setting.tokens, seq), seq, model=loaded.model)
    start = time.perf_counter()
    r = evaluate.perplexity(loaded.model, blocks, batch)
    param = next(loaded.model.parameters())
    return {**r, "seconds": time.perf_counter() - start, "place": _place(param.device, param.dtype)}


def _result(row: dict, setting: Setting, was_cached: bool) -> dict:
    return {"ppl": row["ppl"], "loss": row["loss"], "tokens": row["tokens"], "place": row["place"],
            "setting": setting.label, "canonical": setting == canonical(), "cached": was_cached}


def pair(before: dict, after: dict) -> dict:
    """A job's canonical scores of its input and output models, for its result."""
    return {"setting": after["setting"], "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "before": before, "after": after}


def label(ppl: float | None, setting: str | None = None) -> str:
    """A perplexity with the setting it was measured under, for the app's texts."""
    if ppl is None:
        return "not scored"
    return f"{ppl:.2f} ({setting or canonical().label})"
