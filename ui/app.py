"""The Gradio Blocks app: one tab per step, assembled from the ui/*_tab.py modules."""

from __future__ import annotations

import threading
import time

import gradio as gr

from compact import cleanup
from ui import (
    challenge_tab,
    compare_tab,
    distill_tab,
    experiments_tab,
    export_tab,
    importance_tab,
    model_tab,
    prune_tab,
    sparsify_tab,
    start_tab,
)
from ui import state as st
from ui.common import Ctx

TITLE = "compact — shrink a language model"
CSS = """
.generation textarea { font-family: ui-monospace, monospace; font-size: 0.9em; }
.offscreen { position: absolute !important; left: -10000px; width: 1px; }
"""
# A click on a point of the Pareto plot (ui/export_tab.py) writes the point's model (its
# customdata) into the hidden #pareto-picked box, whose change event picks it for Compare.
# gr.Plot has no select event of its own; Plotly's graph div has plotly_click.
PARETO_JS = """<script>
setInterval(() => {
  const plot = document.querySelector('#pareto-plot .js-plotly-plot');
  if (!plot || plot.compactPick || !plot.on) return;
  plot.compactPick = true;
  plot.on('plotly_click', (event) => {
    const point = (event.points || []).find(p => p.customdata !== undefined);
    const box = document.querySelector('#pareto-picked textarea, #pareto-picked input');
    if (!point || !box) return;
    box.value = point.customdata + '\t' + Date.now();  // a new value each click: a change event
    box.dispatchEvent(new Event('input', {bubbles: true}));
  });
}, 500);
</script>"""


def build_app() -> gr.Blocks:
    with gr.Blocks(title="compact", fill_width=True) as app:
        gr.Markdown(f"# {TITLE}\nLoad a model, see which layers, heads, neurons and channels matter, "
                    "prune or sparsify it, distill it back toward the original, and compare them.")
        ctx = Ctx(state=gr.State(st.new_session()))
        # Outside every tab: a BrowserState reads the browser's storage only once it is on the page.
        ctx.components["nickname"] = gr.BrowserState("", storage_key="compact-challenge-nickname")
        with gr.Tabs(selected="start") as tabs:
            for tab in (start_tab, model_tab, importance_tab, prune_tab, sparsify_tab, distill_tab,
                        compare_tab, experiments_tab, export_tab, challenge_tab):
                tab.build(ctx)
        ctx.wire(app)
        ctx.wire_tabs(tabs)
    return app


def clean_periodically(every_s: float = 1800) -> None:
    """Drop old session outputs (age and disk quota from the settings), now and then again."""
    s = st.SETTINGS

    def loop():
        while True:
            try:
                cleanup.clean(st.data_root(), s.max_age_hours, s.disk_quota_gb * 2**30)
            except OSError as e:  # a folder vanishing under us is not worth stopping the server
                print(f"cleanup: {e}")
            time.sleep(every_s)

    threading.Thread(target=loop, name="cleanup", daemon=True).start()


QUEUE_POLL_S = 0.05  # how often the free queue looks for a new event (Gradio: 1 ms; 50 ms on Windows)
PROGRESS_POLL_S = 0.1  # how often it looks for progress to send (Gradio: 10 ms)


def calm_queue(app: gr.Blocks) -> None:
    """Slow the polling of Gradio's queue when it is free. At its own 1 ms and 10 ms an idle
    server woke about 860 times a second and took 7% of a core; on a 2-core machine each wake-up
    can stall a worker's OpenMP threads at their next barrier. 50 ms more before an event starts
    is far below a click's latency (Gradio itself waits 50 ms on Windows); progress still
    reaches the page ten times a second. Gradio has no public setting for either."""
    queue = getattr(app, "_queue", None)  # tests/test_spaces.py fails if Gradio renames these
    if queue is None:
        return
    queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_S)
    queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, PROGRESS_POLL_S)


def launch(app: gr.Blocks | None = None, **kwargs):
    """Queue with a bounded size, then serve with the settings' auth and limits.

    Host and port are passed only where COMPACT_HOST / COMPACT_PORT set them; otherwise Gradio
    reads its own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (a Gradio Space sets them).
    """
    s = st.SETTINGS
    app = app or build_app()
    clean_periodically()
    app.queue(max_size=s.queue_size, default_concurrency_limit=4)
    calm_queue(app)
    options = dict(auth=s.auth, css=CSS, head=PARETO_JS, max_file_size=f"{s.max_upload_mb}mb",
                   allowed_paths=[str(st.data_root())], show_error=True)
    if s.host is not None:
        options["server_name"] = s.host
    if s.port is not None:
        options["server_port"] = s.port
    options.update(kwargs)
    return app.launch(**options)
