"""Gradio Blocks app: load a model and generate (the full tabs arrive with the UI issue)."""

from __future__ import annotations

import gradio as gr

from compact import evaluate, models
from compact.errors import UserError

_CACHE: dict[str, models.Loaded] = {}


def _get(ref: str) -> models.Loaded:
    ref = (ref or models.DEFAULT_REF).strip()
    if ref not in _CACHE:
        _CACHE[ref] = models.load(ref)
    return _CACHE[ref]


def load_model(ref: str):
    try:
        return _get(ref).info()
    except UserError as e:
        raise gr.Error(str(e)) from None


def generate(ref: str, prompt: str, max_new_tokens: int):
    try:
        loaded = _get(ref)
        out = evaluate.generate(loaded.model, loaded.tokenizer, prompt, int(max_new_tokens))
    except UserError as e:
        raise gr.Error(str(e)) from None
    return out["text"], f"{out['tokens_per_s']:.1f} tokens/s"


def build_app() -> gr.Blocks:
    with gr.Blocks(title="compact") as app:
        gr.Markdown("# compact\nLoad a causal LM and generate.")
        ref = gr.Textbox(value=models.DEFAULT_REF, label="Model (Hub id, folder, .gguf or 'default')")
        load = gr.Button("Load")
        info = gr.JSON(label="Model")
        prompt = gr.Textbox(value="The capital of France is", label="Prompt")
        max_new = gr.Slider(1, 256, value=32, step=1, label="Max new tokens")
        go = gr.Button("Generate")
        text = gr.Textbox(label="Generation")
        speed = gr.Textbox(label="Speed")
        load.click(load_model, ref, info, api_name="load")
        go.click(generate, [ref, prompt, max_new], [text, speed], api_name="generate")
    return app
