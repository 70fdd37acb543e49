"""Export tab: download an output as a zip, push it to the Hub, and the commands that remake it:
this session's, and (when a recorded run made it) the whole chain from the root model."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import gradio as gr

from compact import models
from ui import jobs, lanes, plots
from ui import state as st
from ui.common import HEAVY, Ctx, gib, gpu, human

SKIP = ("checkpoint", "checkpoint.tmp", "teacher_corrected")  # resume state, not the model


def choices(state: dict | None):
    paths = st.output_paths(state)
    return gr.Dropdown(choices=paths, value=paths[-1] if paths else None)


def describe(path: str | None, state: dict | None):
    out = st.find_output(state, path) if path else None
    if out is None:
        return "", "Pick an output of this session."
    path = Path(out.path)
    size = (path.stat().st_size if path.is_file() else st.folder_bytes(path)) if path.exists() else 0
    # The size first, so nobody starts a download they cannot take (weights are stored, not deflated).
    return out.command, f"**{out.kind}** from `{out.source}` at `{out.path}` · zip about {gib(size)}"


REMADE = "remade"  # the folder the chain script writes into


def chain_script(path: str | None, state: dict | None) -> str:
    """`python -m compact reproduce RUN` and the chain's step-by-step commands, from the runs
    store (compact.reproduce), when a recorded run made the output; else empty."""
    from compact import reproduce, runs
    from compact.errors import UserError

    out = st.find_output(state, path) if path else None
    if out is None:
        return ""
    store = runs.RunStore()
    run_id = store.producer(out.path)
    if run_id is None:
        return ""
    try:
        lines = reproduce.script(store, run_id, REMADE)
    except UserError as e:
        return f"# run {run_id} cannot be reproduced: {e}"
    return "\n".join([f"# run {run_id} from its root model, in one command:",
                      f"python -m compact reproduce {run_id} --out {REMADE}",
                      "# or step by step:", *lines])


@jobs.user_errors
def make_zip(path: str | None, state: dict | None, request: gr.Request):
    out = st.find_output(state, path) if path else None
    if out is None or not Path(out.path).exists():
        raise gr.Error("pick an output of this session to download")
    folder = st.session_dir(jobs.session_id(request)) / "exports"
    folder.mkdir(exist_ok=True)
    src = Path(out.path)
    if src.is_file():
        return str(src)
    return str(zip_folder(src, folder / f"{src.name}.zip"))


def zip_folder(src: Path, archive: Path) -> Path:
    """The folder as a zip; weights are stored, not deflated (they barely compress, and
    deflating hundreds of megabytes takes long)."""
    tmp = archive.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_file() and rel.parts[0] not in SKIP:
                stored = path.suffix in (".safetensors", ".bin", ".pt", ".gguf")
                zf.write(path, Path(src.name) / rel, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    tmp.replace(archive)
    return archive


@jobs.user_errors
def push(path: str | None, repo_id: str, token: str, private: bool, state: dict | None,
         oauth: gr.OAuthToken | None = None):
    from huggingface_hub import HfApi

    out = st.find_output(state, path) if path else None
    if out is None or not Path(out.path).is_dir():
        raise gr.Error("pick a model folder of this session to push")
    token = (token or "").strip() or (oauth.token if oauth else None) or os.environ.get("HF_TOKEN")
    if not token:
        raise gr.Error("give a Hugging Face token with write access (or log in on Spaces)")
    if not repo_id or "/" not in repo_id:
        raise gr.Error("the repository id must look like user/name")
    if not models.hub_reachable():
        raise gr.Error("cannot reach the Hugging Face Hub from this server; download the zip instead")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=bool(private), exist_ok=True)
        info = api.upload_folder(folder_path=out.path, repo_id=repo_id,
                                 commit_message=f"compact: {out.kind} from {out.source}",
                                 ignore_patterns=[f"{d}/*" for d in SKIP])
    except Exception as e:  # the Hub client raises many kinds (auth, network, name) on failure
        first = str(e).splitlines()[0] if str(e) else ""
        raise gr.Error(f"upload to {repo_id} failed: {type(e).__name__}: {first}") from None
    return f"Pushed to [{repo_id}](https://huggingface.co/{repo_id}) ({getattr(info, 'commit_url', '')})"


RUN_COLUMNS = ["id", "kind", "status", "base_model", "artifact", "artifact_exists", "error", "started"]


def _visible_runs(request: gr.Request) -> list[dict]:
    from compact import runs

    sid = None if st.SETTINGS.shared_runs else jobs.session_id(request)
    # Without a session filter (shared runs), CLI runs of the operator's own shell stay hidden.
    store = runs.RunStore()
    rows = [r for r in store.list(session=sid, limit=500) if sid is not None or r["session"]]
    return lanes.reconcile(rows, store)  # a worker stopped by a server restart: interrupted


def list_runs(request: gr.Request) -> dict:
    """This session's runs from the runs store (every run when the server shares runs), newest
    first; the store outlives restarts, so earlier runs and their artifacts stay listed."""
    rows = []
    for r in _visible_runs(request):
        r["artifact_exists"] = bool(r["artifact"]) and Path(r["artifact"]).exists()
        rows.append([r[c] for c in RUN_COLUMNS])
    return {"headers": RUN_COLUMNS, "data": rows}


def workspace_models(state: dict | None, request: gr.Request) -> list[dict]:
    """Every model of the workspace: the loaded roots, then each finished run's artifact still on
    disk, with its size and its canonical score (None: not scored yet)."""
    from compact import scoreboard
    from compact.runs import RunStore

    state, store = st.session(state), RunStore()
    found = []
    for ref in state.get("roots", [state["ref"]]):
        params = st.CACHE.get(ref).params
        found.append({"ref": ref, "label": f"{Path(ref).name} (loaded)", "params": params,
                      "nonzero_params": params, "run": None, "score": scoreboard.cached(ref, store=store)})
    for r in _visible_runs(request):
        artifact = r.get("artifact")
        if r["status"] != "succeeded" or not artifact or not isinstance(r.get("params"), int) \
                or not (Path(artifact) / "config.json").is_file():
            continue  # a scores file, a failed run, or a folder cleaned since
        found.append({"ref": artifact, "label": f"#{r['id']} {r['kind']} · {Path(artifact).name}",
                      "params": r["params"], "nonzero_params": r.get("nonzero_params") or r["params"],
                      "run": r["id"], "score": scoreboard.cached(artifact, store=store)})
    return found


def pareto_plot(nonzero: bool, state: dict | None, request: gr.Request):
    """Parameters (or non-zero parameters) against canonical perplexity of every scored model of
    the workspace, with the frontier; a click on a point picks that model for Compare."""
    from compact import runs, scoreboard

    every = workspace_models(state, request)
    scored = [m for m in every if m["score"]]
    axis = "nonzero_params" if nonzero else "params"
    points = [(m[axis], m["score"]["ppl"]) for m in scored]
    x_title = "non-zero parameters" if nonzero else "parameters"
    fig = plots.pareto(points, [m["label"] for m in scored], runs.pareto_front(points),
                       refs=[m["ref"] for m in scored], x_title=x_title,
                       y_title=f"perplexity ({scoreboard.canonical().label})")
    missing = len(every) - len(scored)
    note = (f"{missing} model(s) not scored yet: *Score the rest* scores them." if missing
            else "Every model of the workspace is scored.") + " Click a point to pick it for Compare."
    return fig, note


@gpu
@jobs.user_errors
def score_rest(state: dict | None, request: gr.Request, progress=gr.Progress()) -> str:
    """The canonical score of each workspace model that has none yet (one at a time, cached)."""
    from compact import scoreboard

    todo = [m for m in workspace_models(state, request) if not m["score"]]
    for i, m in enumerate(todo):
        progress(i / len(todo), desc=f"scoring {m['label']}")
        with st.CORES.computing():
            scoreboard.score(m["ref"], st.CACHE.get(m["ref"]))
    return f"Scored {len(todo)} model(s); refresh the Pareto view."


def pick_for_compare(picked: str, state: dict | None):
    """A clicked Pareto point becomes Compare's first compressed model (picked: its reference,
    then a tab and the click's time, which makes every click a change)."""
    ref = (picked or "").split("\t")[0]
    if not ref:
        return gr.skip(), gr.skip()
    from ui.common import model_choices

    return (gr.Dropdown(choices=model_choices(state), value=ref),
            f"Picked `{Path(ref).name}` for Compare (its first compressed model).")


def lineage(state: dict | None, request: gr.Request) -> str:
    """The workspace's models as a tree: each root model, and under it each run under the run
    that made its input model, with shape, size and canonical perplexity."""
    from compact import runs, scoreboard

    def ppl(ref: str | None) -> list[str]:
        score = scoreboard.cached(ref) if ref else None
        return [f"ppl {score['ppl']:.2f}"] if score else []

    lines, root = [], None
    for depth, r in runs.tree([r for r in _visible_runs(request) if r["status"] == "succeeded"]):
        if depth == 0 and r.get("base_model") != root:
            root = r.get("base_model")
            lines.append(" · ".join([f"{Path(root or '?').name} (root)", *ppl(root)]))
        parts = [f"#{r['id']} {r['kind']}"]
        shape = r.get("shape") or {}
        if shape.get("layers"):
            parts.append(f"{shape['layers']}L")
        if isinstance(r.get("params"), int):
            parts.append(human(r["params"]))
        if isinstance(r.get("nonzero_params"), int):
            parts.append(f"{human(r['nonzero_params'])} non-zero")
        parts += ppl(r.get("artifact"))
        if r.get("artifact"):
            parts.append(f"→ {Path(r['artifact']).name}")
        lines.append("    " * depth + "└─ " + " · ".join(parts))
    if not lines:
        return "No finished run in this session yet."
    return ("```\n" + "\n".join(lines) + "\n```\n" +
            f"ppl: the workspace's canonical evaluation ({scoreboard.canonical().label}).")


def loss_curves(ids: str, request: gr.Request):
    """Training loss of the chosen runs (comma-separated ids; empty: every training run)."""
    from compact import runs

    visible = {r["id"]: r for r in _visible_runs(request)}
    try:
        wanted = [int(x) for x in ids.replace(" ", "").split(",") if x] if ids else list(visible)
    except ValueError:
        raise gr.Error("run ids must be whole numbers separated by commas") from None
    unknown = [i for i in wanted if i not in visible]
    if unknown:
        raise gr.Error(f"no run #{unknown[0]} in this session")
    series = {f"#{i} {visible[i]['kind']}": runs.loss_curve(visible[i]) for i in wanted}
    return plots.overlay(series, "Training loss")


def build(ctx: Ctx) -> None:
    with gr.Tab("Export", id="export"):
        gr.Markdown("Every output of this session: download it, push it to the Hub, or remake it "
                    "from the command line with the command below.")
        output = gr.Dropdown([], value=None, allow_custom_value=True, label="Output")
        what = gr.Markdown("Pick an output of this session.")
        cmd = gr.Code(label="Command that reproduces it", language="shell", interactive=False)
        chain = gr.Code(label="The whole chain from the root model (recorded runs)", language="shell",
                        interactive=False)
        with gr.Row():
            zip_btn = gr.Button("Download as zip")
            file = gr.File(label="Zip", interactive=False)
        with gr.Accordion("Push to the Hugging Face Hub", open=False):
            if os.environ.get("SPACE_ID"):
                gr.LoginButton()
            with gr.Row():
                repo_id = gr.Textbox(label="Repository (user/name)")
                token = gr.Textbox(label="Token (write access)", type="password")
                private = gr.Checkbox(value=True, label="Private")
            push_btn = gr.Button("Push")
            pushed = gr.Markdown()
        with gr.Accordion("Runs", open=False, elem_id="runs-acc"):
            runs_btn = gr.Button("Refresh runs")
            runs_table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, label="Runs of this session")
            lineage_btn = gr.Button("Lineage")
            lineage_md = gr.Markdown(elem_id="lineage")
            with gr.Row():
                pareto_btn = gr.Button("Pareto view")
                nonzero = gr.Checkbox(value=False, label="Non-zero parameters (sparse models)")
                score_btn = gr.Button("Score the rest")
            pareto_note = gr.Markdown(elem_id="pareto-note")
            pareto_fig = gr.Plot(label="Parameters against canonical perplexity", elem_id="pareto-plot")
            # Written by the plot's click handler (ui/app.py PARETO_JS); hidden by CSS, not
            # visible=False, so that it is in the page for the script to fill.
            picked = gr.Textbox(elem_id="pareto-picked", elem_classes=["offscreen"], show_label=False)
            with gr.Row():
                curve_ids = gr.Textbox(label="Runs to overlay (ids, comma-separated; empty: all)")
                curves_btn = gr.Button("Loss curves")
            curves_fig = gr.Plot(label="Training loss")
    output.change(describe, [output, ctx.state], [cmd, what], api_name="export_command")
    output.change(chain_script, [output, ctx.state], chain, api_name="export_reproduce")
    zip_btn.click(make_zip, [output, ctx.state], file, api_name="export_zip")
    push_btn.click(push, [output, repo_id, token, private, ctx.state], pushed, api_name="push")
    ctx.on_outputs.append((choices, [ctx.state], [output]))
    runs_btn.click(list_runs, None, runs_table, api_name="runs")
    pareto_btn.click(pareto_plot, [nonzero, ctx.state], [pareto_fig, pareto_note], api_name="runs_pareto")
    nonzero.change(pareto_plot, [nonzero, ctx.state], [pareto_fig, pareto_note], api_visibility="private")
    score_btn.click(score_rest, ctx.state, pareto_note, api_name="score_rest", **HEAVY)
    picked.change(pick_for_compare, [picked, ctx.state], [ctx.components["compare_slot"], pareto_note],
                 api_name="pareto_pick")
    lineage_btn.click(lineage, ctx.state, lineage_md, api_name="runs_lineage")
    curves_btn.click(loss_curves, curve_ids, curves_fig, api_name="runs_loss_curves")
