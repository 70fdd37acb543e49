"""What the app keeps between events: a shared model cache and each session's artifacts.

The cache is shared by every session (loading the same model twice would waste memory) and is
bounded by bytes: the least recently used models are dropped when a new one would not fit.
Jobs that change a model in place (prune, sparsify, distill) take a private copy, never the
cached object. Session state is a plain dict in gr.State: the current model ref, the
importance scores and every output folder the session made, with the command that remakes it.
"""

from __future__ import annotations

import copy
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from compact import hardware, models, settings
from compact.errors import UserError

SETTINGS = settings.load()
# The cores, shared by what computes at once: workers and the server's computing threads.
CORES = hardware.CoreShares(fixed=hardware.omp_threads())


def data_root() -> Path:
    """Where the app writes outputs: $COMPACT_DATA, default ./data (gitignored)."""
    root = SETTINGS.data_dir
    root.mkdir(parents=True, exist_ok=True)
    return root


def session_dir(session_hash: str | None) -> Path:
    """A per-session output folder: <data>/<session>/<artifact>, as compact.cleanup expects."""
    name = re.sub(r"[^A-Za-z0-9_-]", "", session_hash or "")[:24] or "local"
    path = data_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def check_quota(folder: Path, expected_bytes: int) -> None:
    """Refuse, before it starts, a job whose output would take the session past its quota."""
    quota = int(SETTINGS.session_quota_gb * 2**30)
    used = folder_bytes(folder)
    if quota > 0 and used + expected_bytes > quota:
        raise UserError(f"this job would write about {expected_bytes / 2**30:.2f} GiB, and this session "
                        f"already uses {used / 2**30:.2f} of its {SETTINGS.session_quota_gb:g} GiB; "
                        "delete or export earlier outputs first")


def next_output(session_hash: str | None, kind: str, expected_bytes: int = 0) -> Path:
    """A fresh folder name for a job's output: pruned-1, pruned-2, ...

    The folder is made here (mkdir fails if it exists), so two jobs started at once never get
    the same name; a file output (importance-N.safetensors) sits beside its reserved folder.
    expected_bytes: what the job will write, checked against the session's disk quota first.
    """
    folder = session_dir(session_hash)
    check_quota(folder, expected_bytes)
    n = 1
    while True:
        path = folder / f"{kind}-{n}"
        if not path.with_suffix(".safetensors").exists():
            try:
                path.mkdir()
                return path
            except FileExistsError:
                pass
        n += 1


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def checkpoint_bytes(loaded: models.Loaded, params: int | None = None, training: bool = False) -> int:
    """What a saved copy of a model (or of a pruned one with `params`) weighs on disk, in the
    dtype it is saved in (the source's, when the loader recorded it); `training` adds the
    training checkpoint kept meanwhile: fp32 weights and two Adam moments, 12 bytes a weight."""
    dtype = getattr(loaded, "source_dtype", None) or next(loaded.model.parameters()).dtype
    params = params or sum(p.numel() for p in loaded.model.parameters())
    return params * (dtype.itemsize + (12 if training else 0))


def check_ref(ref: str | None) -> str:
    """A model ref a visitor may load: 'default', a Hub id, or a path inside the allowed folders."""
    ref = (ref or "").strip() or models.DEFAULT_REF
    looks_local = ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists()
    if ref != models.DEFAULT_REF and looks_local:
        return str(settings.safe_path(ref, SETTINGS.allowed_dirs))
    return ref


DATA_KEYWORDS = ("builtin", "teacher")


def check_data(src: str | None) -> str:
    """A data source a visitor may use: builtin, teacher, hf:NAME, or a .txt/.jsonl file inside
    the allowed folders (uploads are copied into the session folder, which is inside)."""
    src = (src or "").strip() or "builtin"
    if src in DATA_KEYWORDS or src.startswith("hf:"):
        return src
    path = Path(src).expanduser()
    if "/" in src or path.suffix or path.exists():
        return str(settings.safe_path(src, SETTINGS.allowed_dirs))
    return src  # no path at all: compact.data says which sources there are


def cache_key(ref: str | None) -> str:
    ref = check_ref(ref)
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def load_model(ref: str) -> models.Loaded:
    return models.load(check_ref(ref), trust_remote_code=SETTINGS.allow_remote_code,
                       allow_pickle=SETTINGS.allow_pickle)


class ModelCache:
    """Loaded models shared across sessions, least recently used dropped beyond max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[models.Loaded, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, ref: str | None) -> models.Loaded:
        key = cache_key(ref)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one load per key even when two sessions ask at once
            with self._lock:
                if key in self._items:
                    return self._items[key][0]
            loaded = load_model(key)
            size = model_bytes(loaded.model)
            with self._lock:
                self._share_tokenizer(loaded)
                self._items[key] = (loaded, size)
                self._evict(keep=key)
                self._loading.pop(key, None)
            return loaded

    def copy(self, ref: str | None) -> models.Loaded:
        """A private copy for jobs that change the weights; the tokenizer is shared."""
        loaded = self.get(ref)
        return models.Loaded(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.arch,
                             loaded.ref, dict(loaded.meta), loaded.source_dtype)

    def _share_tokenizer(self, loaded: models.Loaded) -> None:
        """Pruned and sparse checkpoints carry a copy of their source's tokenizer. Using the one
        object lets compact.data's per-tokenizer cache of tokenized corpora serve them all."""
        tok = loaded.tokenizer
        for other, _ in self._items.values():
            o = other.tokenizer
            if (o is not tok and type(o) is type(tok) and len(o) == len(tok)
                    and o.eos_token_id == tok.eos_token_id and o.pad_token_id == tok.pad_token_id
                    and getattr(o, "chat_template", None) == getattr(tok, "chat_template", None)
                    and o.get_vocab() == tok.get_vocab()):
                loaded.tokenizer = o
                return

    def _evict(self, keep: str) -> None:
        while self.total_bytes() > self.max_bytes and len(self._items) > 1:
            oldest = next(k for k in self._items if k != keep)
            del self._items[oldest]

    def total_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def drop(self, ref: str) -> None:
        with self._lock:
            self._items.pop(cache_key(ref), None)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)


CACHE = ModelCache(int(SETTINGS.model_cache_gb * 2**30))


@dataclass
class Output:
    """One folder a job wrote, with what it is and how to remake it."""

    kind: str  # pruned / sparse / distilled / importance
    path: str
    command: str
    source: str  # the model ref it came from
    summary: dict = field(default_factory=dict)


def new_session() -> dict:
    return {"ref": models.DEFAULT_REF, "roots": [models.DEFAULT_REF], "scores": None, "scores_path": None,
            "scores_command": None, "outputs": []}


def session(value: dict | None) -> dict:
    """The session dict, created on first use (gr.State starts as None)."""
    return value if isinstance(value, dict) and "outputs" in value else new_session()


def add_output(state: dict, out: Output) -> dict:
    state["outputs"] = [o for o in state["outputs"] if o.path != out.path] + [out]
    return state


def outputs(state: dict | None, kinds: tuple[str, ...] | None = None) -> list[Output]:
    """Finished outputs (a cancelled training run holds a checkpoint, not a model yet)."""
    state = session(state)
    return [o for o in state["outputs"] if (kinds is None or o.kind in kinds)
            and o.summary.get("status") not in ("cancelled", "running")]


def output_paths(state: dict | None, kinds: tuple[str, ...] | None = None) -> list[str]:
    return [o.path for o in outputs(state, kinds)]


def resumable(state: dict | None, kind: str, **match) -> Output | None:
    """The newest cancelled run of this kind whose summary matches, to resume."""
    for o in reversed(session(state)["outputs"]):
        if o.kind == kind and o.summary.get("status") == "cancelled" and \
                all(o.summary.get(k) == v for k, v in match.items()):
            return o
    return None


def find_output(state: dict | None, path: str) -> Output | None:
    for o in session(state)["outputs"]:
        if o.path == path:
            return o
    return None
