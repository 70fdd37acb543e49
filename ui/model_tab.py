"""Model tab: pick a model (default preselected), load it, see its card, try a prompt."""

from __future__ import annotations

import threading
import time

import gradio as gr

from compact import evaluate, models
from ui import state as st
from ui.common import QUICK, Ctx, gib, gpu, human
from ui.jobs import user_errors


def card(info: dict) -> str:
    return (
        f"### {info['ref']}\n"
        "| family | layers | hidden | heads | kv heads | head dim | ffn | vocab | parameters | dtype "
        "| device |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {info['family']} | {info['layers']} | {info['hidden']} | {info['heads']} | {info['kv_heads']} | "
        f"{info['head_dim']} | {info['ffn']} | {info['vocab']} | {human(info['params'])} | {info['dtype']} | "
        f"{info['device']} |\n\n"
        f"Minitron pruning: {info['supports']['minitron']}; {info['supports']['generic']}: yes.\n\n"
        f"Model cache: {len(st.CACHE.keys())} model(s), {gib(st.CACHE.total_bytes())} of "
        f"{gib(st.CACHE.max_bytes)}."
    )


@gpu
@user_errors
def load(ref: str, state: dict | None, progress=gr.Progress()):
    state = st.session(state)
    progress(0.1, desc=f"Loading {ref or models.DEFAULT_REF}…")
    loaded = st.CACHE.get(ref)
    state["ref"] = st.check_ref(ref)
    roots = state.setdefault("roots", [models.DEFAULT_REF])
    if state["ref"] not in roots:
        roots.append(state["ref"])  # a new root of the workspace, offered as teacher / original
    info = loaded.info()
    return card(info), info, state


@gpu
@user_errors
def stream_generate(ref: str, prompt: str, max_new_tokens: int, temperature: float, seed: int,
                    chat: bool):
    """Stream a continuation from one model; the last yield carries the speed."""
    loaded = st.CACHE.get(ref)
    for text, result in stream(loaded, prompt, int(max_new_tokens), float(temperature), 1.0, int(seed), chat):
        speed = f"{result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s" if result else "…"
        yield text, speed


def stream(loaded: models.Loaded, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
           seed: int, chat: bool):
    """Yield (text so far, None) while generating, then (text, speed dict).

    model.generate runs in a thread feeding transformers' TextIteratorStreamer; the encoding and
    decoding settings come from compact.evaluate so they match the CLI's generate.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class StopWhenClosed(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return closed.is_set()

    closed = threading.Event()  # set when the page goes away or the run is cancelled
    tok, model = loaded.tokenizer, loaded.model
    ids = evaluate.encode_prompt(tok, model, prompt, max_new_tokens, chat).to(loaded.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    kwargs = evaluate.generation_kwargs(tok, max_new_tokens, temperature, top_p)
    out: dict = {}

    def work():
        try:
            torch.manual_seed(seed)
            with torch.no_grad(), st.CORES.computing():
                out["ids"] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([StopWhenClosed()]),
                                            **kwargs)
        except BaseException as e:  # re-raised below, after the streamer ends
            out["error"] = e
            streamer.end()

    start = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text, None
    finally:
        closed.set()
    thread.join()
    seconds = time.perf_counter() - start
    if "error" in out:
        raise out["error"]
    new = int(out["ids"].shape[1] - ids.shape[1])
    # ids and start: the whole sequence and where the continuation begins (Compare reads them).
    yield text, {"new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds if seconds else 0.0,
                 "ids": out["ids"][0].tolist(), "start": int(ids.shape[1])}


def build(ctx: Ctx) -> None:
    with gr.Tab("Model", id="model"):
        gr.Markdown("Load a causal LM: `default` (SmolLM2-135M-Instruct, offline), a Hub id, "
                    "a checkpoint folder or a `.gguf` file. Every other tab works on this model.")
        with gr.Row():
            ref = gr.Textbox(value=models.DEFAULT_REF, label="Model", scale=4)
            load_btn = gr.Button("Load", variant="primary", scale=1)
        info_md = gr.Markdown("No model loaded yet: `default` loads on first use.")
        info = gr.JSON(label="Details", visible=False)
        with gr.Accordion("Try a prompt", open=False):
            with gr.Row():
                prompt = gr.Textbox(value="The capital of France is", label="Prompt", scale=4)
                gen_btn = gr.Button("Generate", scale=1)
            with gr.Row():
                max_new = gr.Slider(1, 256, value=32, step=1, label="Max new tokens")
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
                seed = gr.Number(value=0, precision=0, label="Seed")
                chat = gr.Checkbox(value=False, label="Chat template")
            text = gr.Textbox(label="Generation", lines=4)
            speed = gr.Markdown()
    event = load_btn.click(load, [ref, ctx.state], [info_md, info, ctx.state], api_name="load", **QUICK)
    submitted = ref.submit(load, [ref, ctx.state], [info_md, info, ctx.state], api_visibility="private",
                           **QUICK)
    ctx.model_events += [event, submitted]
    gen_btn.click(stream_generate, [ref, prompt, max_new, temperature, seed, chat], [text, speed],
                  api_name="generate", **QUICK)
