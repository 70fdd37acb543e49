"""Start tab: the flow of the app, what each step does and which paper it follows.

A workshop's first page. Each step has a button that opens its tab (app.py wires them to the
Tabs component, which this tab cannot see when it is built).
"""

from __future__ import annotations

import gradio as gr

from ui.common import Ctx

# (tab id, button, what the step does and where it comes from)
STEPS = [
    ("model", "1 · Model",
     "Load a causal LM: `default` (SmolLM2-135M-Instruct, offline), a Hub id, a checkpoint folder or a "
     "`.gguf` file. Try a prompt to see what the model can do before you shrink it."),
    ("importance", "2 · Importance",
     "Run calibration text through the model and score every layer, attention head, MLP neuron and "
     "embedding channel by its activations (Minitron, arXiv 2407.14679, section 2.2), and every layer "
     "by how little it changes the hidden state (Block Influence, ShortGPT arXiv 2403.03853). Low "
     "scores are candidates for removal."),
    ("prune", "3 · Prune",
     "Pick target layers, hidden size, MLP size and heads, see the parameter count at once, and trim "
     "the least important parts (Minitron section 2.3). Width (hidden, heads, MLP) usually survives "
     "better than depth once retrained (Table 1 there)."),
    ("distill", "4 · Distill",
     "Retrain the pruned student to match the original teacher's next-token distribution: KL on "
     "softened logits (Minitron section 2.4; teacher correction from arXiv 2408.11796). This is what "
     "turns a damaged pruned model back into a good small one."),
    ("sparsify", "Or · Sparsify",
     "Instead of removing whole parts, zero 2 of every 4 weights (2:4, which NVIDIA GPUs since "
     "Ampere can run sparse): one-shot by magnitude, Wanda (arXiv 2306.11695) or SparseGPT (arXiv "
     "2301.00774), or trained by AST (arXiv 2407.20584), which distills while the masks settle."),
    ("compare", "5 · Compare",
     "The original and up to three compressed models on the same prompt: their texts, where each "
     "parts from the original token by token, size, the workspace's one perplexity, and speed."),
    ("experiments", "Experiments",
     "Several variants in one go (prune targets, methods), each scored the same way, on one plot."),
    ("export", "Export",
     "Every model and run of the workspace: the lineage, the size-against-perplexity Pareto plot "
     "(click a point to compare it), and export as a checkpoint or a command that reproduces it."),
    ("challenge", "Challenge",
     "A workshop's contest: under your nickname, submit your best model within the host's parameter "
     "and training-token budgets; a live leaderboard ranks every submission by perplexity on held-out "
     "text that no step ever trains or calibrates on."),
]

INTRO = """## Shrink a language model, step by step

A language model is a stack of **layers**; each has **attention heads** and an **MLP** of
**neurons**, and all of them read and write a residual stream of **channels** (the hidden size).
Compression removes what matters least and then recovers quality by learning from the original.

**Perplexity** (lower is better) is how surprised a model is by held-out text: every model in this
workspace is scored on the same text (the *canonical* evaluation), so the numbers compare across
tabs. A pruned model's perplexity jumps before distillation and falls back during it.
"""


def build(ctx: Ctx) -> None:
    with gr.Tab("Start", id="start"):
        gr.Markdown(INTRO)
        for tab, label, text in STEPS:
            with gr.Row(equal_height=True):
                button = gr.Button(label, scale=1, min_width=140, elem_id=f"start-{tab}")
                gr.Markdown(text, elem_classes=["start-step"])
            ctx.tab_buttons.append((button, tab))
        gr.Markdown("A typical first hour: load `default`, run Importance with the defaults, prune to "
                    "about two thirds of the parameters, distill a few thousand tokens, then Compare. "
                    "Every step also runs from the command line: each result shows its "
                    "`python -m compact ...` line.")
