"""Compare tab: one prompt, the original and up to three compressed models side by side.

Every model gets the same prompt, decoding settings and seed. Models run one after another
(each streams into its own column) so that each speed is measured alone rather than
with the other models competing for the same device. Then each compressed model reads the
original's text, and its per-token divergence shows where it parts from the original.
"""

from __future__ import annotations

import math
from pathlib import Path

import gradio as gr

from compact import divergence, evaluate, scoreboard
from compact.errors import UserError
from ui import jobs, model_tab
from ui import state as st
from ui.common import HEAVY, Ctx, eval_note, gpu, human, job_buttons, model_choices

SLOTS = 4


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def short(ref: str) -> str:
    """Output folders by their own name (pruned-1), other refs as given."""
    path = Path(ref)
    return path.name if path.is_absolute() else ref


@gpu
@jobs.user_errors
def compare(original: str, slot1: str, slot2: str, slot3: str, prompt: str, max_new_tokens: int,
            temperature: float, top_p: float, seed: int, chat: bool, with_ppl: bool):
    refs = [original or "default", slot1, slot2, slot3]
    texts, speeds, rows = [""] * SLOTS, [""] * SLOTS, []
    parts: list = [None] * (SLOTS - 1)
    results: list[dict] = []
    for i, ref in enumerate(refs):
        if not ref or not str(ref).strip():
            continue
        loaded = st.CACHE.get(ref)
        speeds[i] = f"**{short(ref)}** generating…"
        final = None
        for text, speed in model_tab.stream(loaded, prompt, int(max_new_tokens), float(temperature),
                                            float(top_p), int(seed), bool(chat)):
            texts[i], final = text, speed  # the last item carries the whole run's speed
            yield *texts, *speeds, gr.skip(), gr.skip(), *parts
        speeds[i] = f"**{short(ref)}**: {final['new_tokens']} tokens; measuring speed…"
        yield *texts, *speeds, gr.skip(), gr.skip(), *parts
        # The generation's own tokens/s is not comparable across clicks: measure apart.
        with st.CORES.computing():
            measured = evaluate.speed(loaded.model, prompt_tokens=64, decode_tokens=16)
        speeds[i] = (f"**{short(ref)}**: {final['new_tokens']} tokens; prefill "
                     f"{measured['prefill_tokens_per_s']:,.0f} tokens/s, decode "
                     f"{measured['decode_tokens_per_s']:.1f} tokens/s")
        ids, start = final.pop("ids"), final.pop("start")
        results.append({"slot": i, "model": ref, "text": texts[i], "params": _params(loaded.model),
                        **final, "speed": measured})
        if len(results) == 1:
            original_run = loaded, ids, start  # every other model reads the original's text
        elif original_run[2] < len(original_run[1]):
            parts[i - 1] = _parts(original_run, loaded, results[-1])
        yield *texts, *speeds, gr.skip(), gr.skip(), *parts
    greedy = not temperature
    for r in results:
        if with_ppl:  # the workspace's canonical score: cached for models a job already scored
            with st.CORES.computing():
                score = scoreboard.score(r["model"], st.CACHE.get(r["model"]))
            r["ppl"], r["ppl_setting"] = score["ppl"], score["setting"]
        parted = r.get("divergence")
        rows.append([short(r["model"]), human(r["params"]), f"{r['params'] / results[0]['params']:.1%}",
                     round(r["ppl"], 2) if "ppl" in r else None,
                     round(r["speed"]["prefill_tokens_per_s"]), round(r["speed"]["decode_tokens_per_s"], 1),
                     round(parted["mean_kl"], 3) if parted else None,
                     f"{parted['top1_agreement']:.0%}" if parted else None,
                     _first_difference(parted, greedy)])
    yield *texts, *speeds, rows, {"models": results}, *parts


def _parts(original_run, loaded, result: dict) -> list[tuple[str, float | None]]:
    """The original's continuation, one piece per token, each with its KL shade in [0, 1)."""
    original, ids, start = original_run
    try:
        result["divergence"] = parted = divergence.divergence(original.model, loaded.model, ids, start)
    except UserError as e:  # another vocabulary: say so in place of the shading
        return [(str(e), None)]
    tokens = [original.tokenizer.decode([t]) for t in ids[start:]]
    # floored, not rounded, to 3 places: a shade stays below 1 however far apart the models are
    return [(t, math.floor(divergence.shade(kl) * 1000) / 1000)
            for t, kl in zip(tokens, parted["kl"], strict=True)]


def _first_difference(parted: dict | None, greedy: bool) -> str | None:
    """Where this model's greedy output first differs; only meaningful when both decode greedily."""
    if not parted or not greedy:
        return None
    at = parted["first_difference"]
    return "none" if at is None else f"token {at + 1}"


def choices(state: dict | None, *current: str | None):
    """New outputs become choices; the newest fills the first empty slot."""
    options = model_choices(state)
    newest = options[-1][1] if options else None
    updates, placed = [], False
    for value in current:
        if not value and newest and not placed and newest not in current:
            updates.append(gr.Dropdown(choices=options, value=newest))
            placed = True
        else:
            updates.append(gr.Dropdown(choices=options))
    return updates


def build(ctx: Ctx) -> None:
    with gr.Tab("Compare", id="compare"):
        gr.Markdown("The same prompt, decoding settings and seed for every model. Pick compressed "
                    "models made in this session, or type any model reference.")
        with gr.Row():
            original = gr.Dropdown(model_choices(None, roots=True), value="default", allow_custom_value=True,
                                   label="Original")
            slots = [gr.Dropdown([], value=None, allow_custom_value=True, label=f"Compressed {i}",
                                 elem_id=f"cmp-slot-{i}")
                     for i in range(1, SLOTS)]
        with gr.Row():
            prompt = gr.Textbox(value="The capital of France is", label="Prompt", scale=3)
            go, stop = job_buttons("Generate", scale=1)
        with gr.Row():
            max_new = gr.Slider(1, 256, value=48, step=1, label="Max new tokens", elem_id="cmp-max-new")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed")
            chat = gr.Checkbox(value=False, label="Chat template")
        with gr.Row():
            with_ppl = gr.Checkbox(value=True, label="Perplexity")
            gr.Markdown(eval_note())
        texts, speeds = [], []
        with gr.Row(equal_height=True):
            for i in range(SLOTS):
                with gr.Column(min_width=200):
                    texts.append(gr.Textbox(label="Original" if i == 0 else f"Compressed {i}", lines=8,
                                            elem_classes=["generation"], elem_id=f"cmp-text-{i}"))
                    speeds.append(gr.Markdown(elem_id=f"cmp-speed-{i}"))
        gr.Markdown("**Where each model parts from the original.** Each compressed model reads the "
                    "original's text; every token is shaded by the KL divergence between the two "
                    "models' predictions of it (white: the same prediction, dark: far apart; shade = "
                    "1 − e^−KL). With temperature 0 the table's *first difference* is the token at "
                    "which that model's own greedy output leaves the original's.")
        parts = [gr.HighlightedText(label=f"Compressed {i}: divergence per token", show_legend=False,
                                    combine_adjacent=False, elem_id=f"cmp-parts-{i}")
                 for i in range(1, SLOTS)]
        table = gr.Dataframe(headers=["model", "parameters", "of original", "canonical ppl",
                                      "prefill tokens/s", "decode tokens/s", "mean KL",
                                      "top-1 agreement", "first difference"],
                             interactive=False, label="Size and quality", elem_id="cmp-table")
        summary = gr.JSON(visible=False)
    event = go.click(compare, [original, *slots, prompt, max_new, temperature, top_p, seed, chat, with_ppl],
                     [*texts, *speeds, table, summary, *parts], api_name="compare", **HEAVY)
    stop.click(None, None, None, cancels=[event], api_visibility="private")
    ctx.on_outputs.append((choices, [ctx.state, *slots], slots))
    ctx.components["compare_slot"] = slots[0]  # the Pareto plot's selection lands here
    # A newly loaded model joins the choices; what is picked stays picked.
    ctx.on_model.append((lambda state: gr.Dropdown(choices=model_choices(state, roots=True)), [ctx.state],
                         [original]))
