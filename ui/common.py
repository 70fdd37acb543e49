"""What the tabs share: the wiring context, queue settings for heavy events, number formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from compact import hardware, models, scoreboard
from ui import state as st

# Interactive events that run a model over many tokens in the server (importance, prune, compare)
# share one queue slot pool: one concurrency id with a limit, so a GPU is never asked to hold two
# of their activations at once.
HEAVY = dict(concurrency_id="gpu", concurrency_limit=st.SETTINGS.gpu_concurrency)
# Quick ones (load, generate) have their own pool of the same size: a generate answers in seconds
# and must not wait behind other sessions' importance and prune runs (each up to minutes on a CPU).
# One prompt's activations are small beside a calibration batch, and importance's hooks act only in
# their own thread (compact.arch.own_thread), so both may run on the same cached model at once.
QUICK = dict(concurrency_id="quick", concurrency_limit=st.SETTINGS.gpu_concurrency)
# Long jobs run in worker processes (ui/lanes.py), as many at once as there are workers, in
# their own group: an interactive event never waits behind one. Without workers they run in the
# server and share the interactive events' group, as every model-running event used to.
LONG = dict(concurrency_id="workers", concurrency_limit=st.SETTINGS.workers) if st.SETTINGS.workers \
    else HEAVY
DATA_CHOICES = ["builtin", "teacher"]
# Job sizes the tabs start with, by this server's device (compact.hardware.APP_SIZES).
SIZES = hardware.app_sizes(hardware.props(models.pick_device()))
UPLOAD_TYPES = [".txt", ".jsonl"]

try:  # ZeroGPU on Hugging Face Spaces: a GPU is attached only inside functions marked for it
    import spaces as _spaces
except ImportError:
    _spaces = None


def gpu(fn: Callable) -> Callable:
    """spaces.GPU(fn) where the `spaces` package is importable (ZeroGPU); fn itself elsewhere."""
    return _spaces.GPU(fn) if _spaces is not None else fn


def take_upload(path: str | None, request: gr.Request) -> str:
    """Copy an uploaded .txt/.jsonl into the session folder (inside the allowed folders) and
    return its path as the data source. Gradio already refused it if over max_file_size."""
    import shutil

    from compact.errors import UserError
    from ui import jobs

    if not path:
        return gr.skip()
    src = Path(path)
    if src.suffix.lower() not in UPLOAD_TYPES:
        raise gr.Error(f"uploads must be {' or '.join(UPLOAD_TYPES)} files, not '{src.suffix or src.name}'")
    folder = st.session_dir(jobs.session_id(request)) / "uploads"
    folder.mkdir(exist_ok=True)
    dest = folder / src.name
    shutil.copyfile(src, dest)
    try:
        from compact import data
        data.file_texts(dest)  # empty, binary, not UTF-8, jsonl without text: say so now
    except UserError as e:
        dest.unlink(missing_ok=True)
        raise gr.Error(str(e)) from None
    return str(dest)


@dataclass
class Ctx:
    """Shared components and the refreshes to run after the model or the outputs change.

    Tabs are built one after another, so a tab cannot wire itself to a later tab's
    components; it registers its events and refreshes here and the app joins them at the end.
    """

    state: gr.State
    model_events: list = field(default_factory=list)  # events after which the model changed
    output_events: list = field(default_factory=list)  # events after which outputs changed
    on_model: list[tuple[Callable, list, list]] = field(default_factory=list)
    on_outputs: list[tuple[Callable, list, list]] = field(default_factory=list)
    on_load: list[tuple[Callable, list, list]] = field(default_factory=list)  # when a page opens
    components: dict[str, gr.components.Component] = field(default_factory=dict)  # for later tabs
    tab_buttons: list[tuple[gr.Button, str]] = field(default_factory=list)  # a button, the tab it opens

    def wire_tabs(self, tabs: gr.Tabs) -> None:
        for button, tab in self.tab_buttons:
            button.click(lambda tab=tab: gr.Tabs(selected=tab), None, tabs, queue=False,
                         api_visibility="private")

    def wire(self, app: gr.Blocks | None = None) -> None:
        if app is not None:
            for fn, inputs, outputs in self.on_load:
                app.load(fn, inputs, outputs, queue=False, api_visibility="private")
        for event in self.model_events:
            for fn, inputs, outputs in self.on_model:
                event.then(fn, inputs, outputs, queue=False, api_visibility="private")
        for event in self.output_events:
            for fn, inputs, outputs in self.on_outputs:
                event.then(fn, inputs, outputs, queue=False, api_visibility="private")


def current_ref(state: dict | None) -> str:
    """The reference of the session's model (the one the Model tab loaded last)."""
    return st.session(state)["ref"]


def current(state: dict | None) -> models.Loaded:
    """The session's model from the shared cache (loaded on first use)."""
    return st.CACHE.get(current_ref(state))


def job_buttons(label: str, **layout) -> tuple[gr.Button, gr.Button]:
    """A job tab's start button and its Cancel, placed in the caller's layout."""
    return gr.Button(label, variant="primary", **layout), gr.Button("Cancel", variant="stop", **layout)


def upload_box(what: str) -> gr.File:
    """The optional text upload beside a data choice."""
    return gr.File(label=f"Or upload {what} text (.txt or .jsonl with a 'text' field)",
                   file_types=UPLOAD_TYPES, type="filepath", height=80)


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def model_choices(state: dict | None, roots: bool = False) -> list[tuple[str, str]]:
    """The workspace's models as (label, ref) for a picker: `pruned-2 · 24L · 92.0M`, not a path.

    roots: also the models loaded on the Model tab (a teacher or an original to compare with).
    """
    state = st.session(state)
    found: list[tuple[str, str]] = []
    if roots:
        found += [(f"{ref} · loaded", ref) for ref in state.get("roots", [state["ref"]])]
    from compact.runs import RunStore

    store = RunStore()  # one connection's worth of set-up for all the scores below
    for out in st.outputs(state, ("pruned", "sparse", "distilled")):
        shape, params = out.summary.get("shape"), out.summary.get("params")
        parts = [Path(out.path).name, out.kind]
        if isinstance(shape, dict) and shape.get("layers"):
            parts.append(f"{shape['layers']}L")
        if isinstance(params, int):
            parts.append(human(params))
        score = scoreboard.cached(out.path, store=store)
        if score:
            parts.append(f"ppl {score['ppl']:.2f}")
        found.append((" · ".join(parts), out.path))
    return found


def scored(before_after: dict | None) -> str:
    """A job's canonical perplexities (compact.scoreboard.pair) for its message, setting named."""
    if not before_after:
        return ""
    return (f"perplexity {before_after['ppl_before']:.2f} → **{before_after['ppl_after']:.2f}** "
            f"({before_after['setting']})")


# What to do after each job: the workshop's next step, in the words of the tabs.
NEXT = {
    "importance": "Next: **Prune** picks target sizes and trims the parts these scores rank lowest.",
    "prune": "Next: **Distill** it from the original to win the perplexity back, or **Compare** it now.",
    "distill": "Next: **Compare** it with the original, or see it on the **Export** tab's Pareto plot.",
    "sparsify": "Next: **Compare** it with the original; AST models usually beat one-shot ones there.",
    "experiment": "Next: pick the best arm's model in **Compare**, or on the **Export** tab's Pareto plot.",
}


def saved(out, job: str) -> str:
    """Where a job's result went, by the name the pickers show, and the step after it."""
    return f"Saved as **{Path(out).name}**. {NEXT[job]}"


def eval_note() -> str:
    """What every perplexity in the app means, for the tabs that show one."""
    return (f"Perplexity is the workspace's canonical evaluation: {scoreboard.canonical().label}, "
            "the same blocks for every model, computed once per model.")


def follow_models(ctx: Ctx, picker: gr.Dropdown) -> None:
    """A model picker whose choices follow the workspace (new outputs, newly loaded models);
    what is picked stays picked."""
    refresh = (lambda state: gr.Dropdown(choices=model_choices(state, roots=True)), [ctx.state], [picker])
    ctx.on_outputs.append(refresh)
    ctx.on_model.append(refresh)


def shape_row(shape) -> dict:
    return {"layers": shape.layers, "hidden": shape.hidden, "ffn": shape.ffn, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "params": shape.params}
