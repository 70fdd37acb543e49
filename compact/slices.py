"""A resumable training job as a sequence of time-bounded slices.

ZeroGPU (Hugging Face Spaces) attaches a GPU only for one call of a function marked with
`spaces.GPU(duration=...)`, a few minutes at most. A distillation or AST run longer than that
runs here as slices: each slice runs the job until its time budget is spent, the job saves its
checkpoint and stops (its should_stop turned true), and the next slice resumes it exactly
(compact.train's exact resume), until it finishes. A sliced run therefore ends with the same
weights as an unsliced one (tests/test_slices.py).

A slice returns plain data (finished, result, events) because on ZeroGPU it runs in a child
process: callbacks into the caller would not reach it. The caller relays the events after each
slice, and asks its own should_stop between slices.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

from compact.errors import Cancelled

LOAD_S = 30.0  # a slice's fixed costs: loading the models, the last save and scoring
ZERO_TOKENS_PER_S = 20_000.0  # a cautious training speed on a ZeroGPU slice for the size estimate


def max_slice_s() -> float:
    """The longest GPU call the Space allows us to ask for (COMPACT_ZERO_SLICE_S, default 120)."""
    return float(os.environ.get("COMPACT_ZERO_SLICE_S") or 120)


def duration(cfg, tokens_per_s: float = ZERO_TOKENS_PER_S) -> float:
    """Seconds to ask for one slice of a training config: its whole estimated time when that fits
    the limit, else the limit."""
    return min(max_slice_s(), LOAD_S + cfg.tokens / tokens_per_s)


def one_slice(run: Callable, cfg, budget_s: float, clock: Callable[[], float] = time.monotonic,
              **kwargs) -> tuple[bool, dict | None, list[dict]]:
    """Run run(cfg, on_event=..., should_stop=..., **kwargs) until it finishes or budget_s has
    passed (then it checkpoints and stops). Returns (finished, result, events)."""
    start, events = clock(), []
    try:
        result = run(cfg, on_event=events.append, should_stop=lambda: clock() - start >= budget_s, **kwargs)
        return True, result, events
    except Cancelled as stop:
        return False, stop.result if isinstance(stop.result, dict) else None, events


def run_sliced(run_slice: Callable, cfg, should_stop: Callable[[], bool] | None = None,
               on_event: Callable[[dict], None] | None = None, max_slices: int = 10_000) -> dict:
    """Call run_slice(cfg) -> (finished, result, events) until the job finishes, the first call
    as cfg says, the next ones resuming. should_stop() (the user's cancel) is asked between
    slices: the last checkpoint stays, and Cancelled is raised with the last result."""
    for n in range(max_slices):
        finished, result, events = run_slice(cfg if n == 0 else dataclasses.replace(cfg, resume=True))
        for event in events:
            if on_event is not None:
                on_event({**event, "slice": n + 1})
        if finished:
            return {**result, "slices": n + 1}
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped after slice {n + 1}; a checkpoint is saved (resume continues)", result)
    raise RuntimeError(f"the job did not finish in {max_slices} slices")
