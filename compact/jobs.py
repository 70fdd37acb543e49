"""Every job compact runs: its command name, config class and library call, in one table.

A job's call is `run(cfg, progress=None, should_stop=None, **preloaded) -> dict`: it writes its
artifact (if any) and returns its result; progress(fraction, message) reports, should_stop()
is asked between batches or steps and a stopped job raises compact.errors.Cancelled. The CLI
builds its commands from this table and the app calls the same functions with the configs it
builds, so `python -m compact <name> ...` and a click in the app do the same work.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from compact import distill, evaluate, experiments, importance, prune, search, sparsify
from compact.options import from_args, to_argv


@dataclass(frozen=True)
class Job:
    name: str
    help: str
    config: type
    run: Callable[..., dict]
    recorded: bool = True  # kept in the runs store (compact.runs)
    events: bool = False  # run takes on_event(dict): training steps a worker relays to the app


JOBS = {job.name: job for job in (
    Job("info", "shape and size of a model", evaluate.InfoConfig, evaluate.info_job, recorded=False),
    Job("eval", "validation loss and perplexity", evaluate.EvalConfig, evaluate.eval_job),
    Job("generate", "continue a prompt", evaluate.GenerateConfig, evaluate.generate_job, recorded=False),
    Job("importance", "Minitron importance of heads, neurons, channels and layers",
        importance.ImportanceConfig, importance.run),
    Job("prune", "Minitron width/depth pruning to a standard checkpoint", prune.PruneConfig, prune.run),
    Job("search", "rank pruned shapes within a parameter budget by calibration loss",
        search.SearchConfig, search.run),
    Job("distill", "knowledge distillation of a student toward a teacher (accelerate)",
        distill.DistillConfig, lambda cfg, progress=None, should_stop=None, **kw:
        distill.run(cfg, progress=progress, should_stop=should_stop, **kw), events=True),
    Job("sparsify", "N:M (2:4) sparsity: one-shot magnitude, Wanda, SparseGPT, or AST training",
        sparsify.SparsifyConfig, sparsify.run, events=True),
    Job("experiment", "reproduce a paper finding: axis-ablation, kd-vs-ce, sparse-methods",
        experiments.ExperimentConfig, experiments.run, recorded=False, events=True),
)}


def command_of(cfg) -> str:
    for job in JOBS.values():
        if type(cfg) is job.config:
            return job.name
    raise KeyError(f"no command takes a {type(cfg).__name__}")


def argv(cfg) -> list[str]:
    """The arguments of `python -m compact` that run cfg: [command, flags...]."""
    return [command_of(cfg), *to_argv(cfg)]


def command_line(cfg, program: str = "python -m compact") -> str:
    """The shell line that reproduces cfg; parse_command_line gives an equal config back."""
    return f"{program} {shlex.join(argv(cfg))}"


def parse_command_line(line: str):
    """The config of a `python -m compact <command> ...` line (as command_line writes it)."""
    from compact.cli import build_parser

    words = shlex.split(line)
    while words and words[0] != "compact" and words[0] not in JOBS:
        words.pop(0)  # python, -m
    if words and words[0] == "compact":
        words.pop(0)
    args = build_parser().parse_args(words)
    return from_args(JOBS[args.command].config, args)
