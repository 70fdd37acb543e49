"""Loss, perplexity, generation and speed of any loaded model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compact.errors import UserError
from compact.options import LoadOptions, option


@torch.no_grad()
def loss_on(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted positions of the blocks."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i: i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                 reduction="sum").item()
        count += target.numel()
    return total / count


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    loss = loss_on(model, blocks, batch_size)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(blocks.numel())}


def context_length(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def encode_prompt(tokenizer, model, prompt: str, max_new_tokens: int, chat: bool = False) -> torch.Tensor:
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty")
    if max_new_tokens <= 0 or max_new_tokens > 4096:
        raise UserError("max new tokens must be between 1 and 4096")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    limit = context_length(model)
    if ids.shape[1] + max_new_tokens > limit:
        raise UserError(f"the prompt has {ids.shape[1]} tokens; with {max_new_tokens} new tokens "
                        f"that exceeds the model's context of {limit}")
    return ids


def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = False) -> dict:
    """Generate a continuation; greedy unless a temperature is given. Returns text and speed."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, model, prompt, max_new_tokens, chat).to(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         **generation_kwargs(tokenizer, max_new_tokens, temperature, top_p))
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return {
        "prompt": prompt,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": seconds,
        "tokens_per_s": new.numel() / seconds if seconds > 0 else 0.0,
    }



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speed(model, prompt_tokens: int = 128, decode_tokens: int = 32, budget_s: float = 3.0) -> dict:
    """Prefill and decode throughput measured apart, after a warm-up, on a fixed prompt.

    A short generation's tokens/s mixes prompt processing into decoding and its first call pays
    for one-time set-up, so clicks disagreed by 2x. Here the prompt is fixed (seeded token ids,
    the same for every model of a vocabulary); prefill is one forward pass over it, timed again
    and again, and decode is greedy steps on the KV cache, each step timed alone. Each phase
    takes samples for half of `budget_s` (at least 3 prefills and `decode_tokens` steps), and
    the rate comes from the fastest fifth of them: other work on a shared machine only ever
    adds time, so the fast end is what repeats from click to click (median spreads were 2-3x
    wider on this project's 2-core machine; see bench/bench_speed.py).
    """
    device = next(model.parameters()).device
    limit = context_length(model)
    decode_tokens = max(1, decode_tokens)
    prompt_tokens = max(1, min(prompt_tokens, limit - decode_tokens - 1))
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=g).to(device)
    was_training = model.training
    model.eval()

    def timed(**inputs):
        _sync(device)
        start = time.perf_counter()
        out = model(use_cache=True, **inputs)
        _sync(device)
        return out, time.perf_counter() - start

    def prefills() -> list[float]:
        samples, start = [], time.perf_counter()
        while len(samples) < 3 or time.perf_counter() - start < budget_s / 2:
            samples.append(timed(input_ids=ids)[1])
        return samples

    def steps() -> list[float]:
        samples, start = [], time.perf_counter()
        while len(samples) < decode_tokens or time.perf_counter() - start < budget_s / 2:
            out = model(input_ids=ids, use_cache=True)  # a fresh cache: every run decodes the same positions
            for _ in range(decode_tokens):
                token = out.logits[:, -1:].argmax(-1)
                out, seconds = timed(input_ids=token, past_key_values=out.past_key_values)
                samples.append(seconds)
        return samples

    try:
        timed(input_ids=ids)  # warm-up: allocator, kernels, caches
        prefill, decode = prefills(), steps()
    finally:
        model.train(was_training)
    return {"prefill_tokens_per_s": prompt_tokens / _fast_end(prefill),
            "decode_tokens_per_s": 1 / _fast_end(decode),
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "prefill_samples": len(prefill), "decode_samples": len(decode)}


def _fast_end(seconds: list[float]) -> float:
    """The time at the fastest fifth of the samples (the minimum below 5 samples)."""
    return sorted(seconds)[len(seconds) // 5]

# -- the jobs -----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class InfoConfig(LoadOptions):
    model: str = option(help="Hub id, local folder, .gguf file or 'default'")


@dataclass(kw_only=True)
class EvalConfig(LoadOptions):
    model: str = option(help="Hub id, local folder, .gguf file or 'default'")
    data: str = option("builtin", "validation text (SRC)")
    tokens: int = option(8192, "validation tokens to score")
    seq_len: int = option(512, "tokens per validation block")
    batch: int = option(8, "blocks per forward pass")


@dataclass(kw_only=True)
class GenerateConfig(LoadOptions):
    model: str = option(help="Hub id, local folder, .gguf file or 'default'")
    prompt: str = option(help="text to continue")
    max_new_tokens: int = option(32, "tokens to generate")
    temperature: float = option(0.0, "0 means greedy")
    top_p: float = option(1.0, "nucleus sampling mass")
    seed: int = option(0, "sampling seed")
    chat: bool = option(False, "wrap the prompt in the chat template")


def info_job(cfg: InfoConfig, progress=None, should_stop=None, loaded=None) -> dict:
    return loaded or cfg.load(cfg.model).info()


def eval_job(cfg: EvalConfig, progress=None, should_stop=None, loaded=None) -> dict:
    from compact import data

    loaded = loaded or cfg.load(cfg.model)
    blocks = data.blocks(cfg.data, loaded.tokenizer, "validation", data.n_blocks_for(cfg.tokens, cfg.seq_len),
                         cfg.seq_len, model=loaded.model)
    return {"model": cfg.model, "data": cfg.data, "seq_len": cfg.seq_len,
            **perplexity(loaded.model, blocks, cfg.batch)}


def generate_job(cfg: GenerateConfig, progress=None, should_stop=None, loaded=None) -> dict:
    loaded = loaded or cfg.load(cfg.model)
    return {"model": cfg.model, **generate(loaded.model, loaded.tokenizer, cfg.prompt, cfg.max_new_tokens,
                                           cfg.temperature, cfg.top_p, cfg.seed, cfg.chat)}
