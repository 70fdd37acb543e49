"""Challenge tab: a workshop's pruning challenge. Participants submit a model of their workspace
under a nickname; a leaderboard that refreshes itself ranks every submission by held-out
perplexity; a host (with the server's COMPACT_CHALLENGE_PASSWORD) sets the budgets.

Budgets, scoring and the ranking are compact.leaderboard's; this module only shows them.
"""

from __future__ import annotations

import gradio as gr

from compact import leaderboard, models
from compact.errors import UserError
from ui import jobs
from ui import state as st
from ui.common import HEAVY, Ctx, follow_models, gpu, human, model_choices

BOARD_HEADERS = ["rank", "nickname", "model", "perplexity", "parameters", "training tokens"]
REFRESH_S = 5  # how often every open page re-reads the leaderboard


def rules() -> str:
    try:
        return f"**The challenge:** {leaderboard.current().rules()}."
    except UserError as e:  # a host's typo in the environment: say it, keep the page up
        return f"⚠️ The challenge is misconfigured: {e}"


def board_rows() -> list[list]:
    try:
        rows = leaderboard.board()
    except UserError:
        return []
    return [[r["rank"], r["nickname"], r["model"], round(r["ppl"], 2), human(r["params"]),
             f"{r['tokens']:,}" if r["tokens"] is not None else "not recorded"] for r in rows]


def refresh():
    return board_rows(), rules()


def host_fields() -> tuple[str, str, str]:
    """The current challenge in the host's fields, so setting one budget keeps the others."""
    challenge = leaderboard.current()
    return challenge.budget or "", challenge.tokens or "", challenge.data


@gpu
@jobs.user_errors
def submit(nickname: str, ref: str | None, state: dict | None, request: gr.Request, progress=gr.Progress()):
    state = st.session(state)
    ref = st.check_ref(ref)
    leaderboard.check_nickname(nickname)  # before a model is loaded for nothing
    progress(0.1, desc="Checking the budgets and scoring on the held-out text…")
    loaded = st.CACHE.get(ref)
    with st.CORES.computing():
        result = leaderboard.submit(nickname, ref, loaded=loaded, session=jobs.session_id(request))
    state["nickname"] = result["nickname"]
    message = (f"Submitted **{result['model']}** as **{result['nickname']}**: held-out perplexity "
               f"**{result['ppl']:.2f}** ({result['setting']}), rank **{result['rank']}**.")
    return message, board_rows(), state


@jobs.user_errors
def set_challenge(password: str, budget: str, tokens: str, data_src: str):
    if not st.SETTINGS.challenge_password:
        raise gr.Error("this server has no host password: set COMPACT_CHALLENGE_PASSWORD to host from here")
    if not leaderboard.authorized(password, st.SETTINGS.challenge_password):
        raise gr.Error("wrong host password")
    challenge = leaderboard.host(budget, tokens, data_src)
    return f"Set: {challenge.rules()}.", *refresh()


def build(ctx: Ctx) -> None:
    with gr.Tab("Challenge", id="challenge"):
        gr.Markdown("## Workshop challenge\nMake the best model within the budgets, then submit it under "
                    "your nickname. Models are ranked by perplexity (lower is better) on held-out text that "
                    "no job calibrates or trains on.")
        rules_md = gr.Markdown(elem_id="challenge-rules")
        with gr.Row():
            nickname = gr.Textbox(label="Nickname", max_length=leaderboard.NICKNAME_CHARS,
                                  elem_id="challenge-nickname", scale=1)
            picker = gr.Dropdown(model_choices(None, roots=True), value=models.DEFAULT_REF,
                                 label="Model to submit (this workspace's)", elem_id="challenge-model",
                                 scale=2)
            go = gr.Button("Submit to the leaderboard", variant="primary", scale=1)
        status = gr.Markdown(elem_id="challenge-status")
        board = gr.Dataframe(headers=BOARD_HEADERS, interactive=False, label="Leaderboard",
                             elem_id="challenge-board")
        with gr.Accordion("Host the challenge", open=False, elem_id="challenge-host"):
            gr.Markdown("For the workshop's host: the server's COMPACT_CHALLENGE_PASSWORD opens this. "
                        "Budgets take 90M, 1.5B or a fraction of the default model such as 0.7; "
                        "empty is no limit.")
            with gr.Row():
                password = gr.Textbox(label="Host password", type="password", elem_id="challenge-password")
                budget = gr.Textbox(label="Parameter budget", elem_id="challenge-budget")
                tokens = gr.Textbox(label="Training-token budget", elem_id="challenge-tokens")
                data_src = gr.Textbox(label="Data source (builtin or hf:NAME)",
                                      elem_id="challenge-data")
            host = gr.Button("Set the challenge")
            host_status = gr.Markdown(elem_id="challenge-host-status")
        timer = gr.Timer(REFRESH_S)

    follow_models(ctx, picker)
    saved_nickname = ctx.components["nickname"]  # a gr.BrowserState, made by ui/app.py
    # The nickname stays in this browser: a reload or a new session keeps it.
    nickname.change(lambda name: name, nickname, saved_nickname, queue=False, api_visibility="private")
    ctx.on_load.append((lambda name: name or gr.skip(), [saved_nickname], [nickname]))
    ctx.on_load.append((refresh, [], [board, rules_md]))
    ctx.on_load.append((host_fields, [], [budget, tokens, data_src]))
    timer.tick(refresh, None, [board, rules_md], queue=False, api_visibility="private")
    go.click(submit, [nickname, picker, ctx.state], [status, board, ctx.state], api_name="submit", **HEAVY)
    host.click(set_challenge, [password, budget, tokens, data_src], [host_status, board, rules_md],
               api_name="host_challenge")
