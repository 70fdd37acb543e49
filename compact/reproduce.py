"""Remake a recorded artifact from its root model: the chain of runs behind it, run again.

Every run recorded with its config (compact.runs) names what it started from: its input model
(the run's parent) and any other earlier artifact it read (a distillation's teacher, a prune's
--importance scores file). `chain` follows those back to root models ('default', a Hub id, a
folder no recorded run wrote) and gives the runs in order, each once; `plan` rewrites them to
write into a new folder:

    OUT/steps/<n>-<command>[.safetensors]   every step before the last
    OUT/<name of the original artifact>      the last one

with every reference to an earlier artifact pointing at its remade copy and resume off (a
resumed run is remade as one run from the start; a cancelled record that a resumed run
finished counts as that finished run). `run` runs the plan; `script` gives it as
`python -m compact ...` lines. An experiment arm is remade by running its whole experiment.
Relative data paths are taken from the folder the original run was started in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from compact.errors import Cancelled, UserError
from compact.runs import REF_FIELDS, RunStore, input_ref

SCORES_SUFFIX = ".safetensors"


@dataclass
class Step:
    run: dict  # the recorded run this step remakes
    command: str  # its command in compact.jobs
    config: object  # its config dataclass (as recorded by chain, rewritten by plan)
    needs: dict[str, int] = field(default_factory=dict)  # config field -> id of the run that made it
    artifact: str | None = None  # what the step writes (recorded by chain, the new path by plan)


def _finished(store: RunStore, run: dict) -> dict:
    """The run itself when it succeeded; else the run that finished its artifact (a resume)."""
    if run["status"] == "succeeded":
        return run
    done = store.producer(run["artifact"]) if run.get("artifact") else None
    if done is None or done < run["id"]:
        raise UserError(f"run {run['id']} did not succeed ({run['status']}): there is nothing to reproduce")
    return store.get(done)


def _config(run: dict):
    from compact.jobs import JOBS

    record = run.get("config") or {}
    job = JOBS.get(record.get("command"))
    if job is None:
        raise UserError(f"run {run['id']} ({run['kind']}) has no recorded config (recorded by an older "
                        "compact, or a job without one): it cannot be reproduced")
    names = {f.name for f in dataclasses.fields(job.config) if f.init}
    try:
        return job.name, job.config(**{k: v for k, v in record["config"].items() if k in names})
    except TypeError as e:
        raise UserError(f"run {run['id']}'s recorded config no longer fits '{job.name}': {e}") from None


def _needs(store: RunStore, run: dict, cfg) -> dict[str, int]:
    cwd = (run.get("config") or {}).get("cwd")
    needs = {}
    for name in REF_FIELDS:
        ref = getattr(cfg, name, None)
        if not isinstance(ref, str) or not ref:
            continue
        made_by = run.get("parent") if ref == input_ref(cfg) else None
        made_by = made_by if made_by is not None else store.producer(ref, before=run["id"], cwd=cwd)
        if made_by is not None:
            needs[name] = made_by
    return needs


def chain(store: RunStore, run_id: int) -> list[Step]:
    """The steps that remake run_id's artifact from root models: dependencies first, each once,
    run_id's own step last. Configs and artifacts are as recorded."""
    steps: dict[int, Step] = {}

    def visit(run: dict) -> None:
        if run["id"] in steps:
            return
        command, cfg = _config(run)
        needs = _needs(store, run, cfg)
        for made_by in needs.values():
            visit(store.get(made_by))
        steps[run["id"]] = Step(run, command, cfg, needs, run.get("artifact"))

    visit(_finished(store, store.get(run_id)))
    return list(steps.values())  # insertion order: every step after the steps it needs


def _absolute_data(src: str, cwd: str | None) -> str:
    """A relative data file of the original run, as an absolute path (keywords stay)."""
    if not cwd or src in ("builtin", "teacher") or src.startswith("hf:") or Path(src).is_absolute():
        return src
    path = Path(cwd) / src
    return str(path) if path.exists() else src


def _new_out(step: Step, out: Path, n: int, last: bool) -> Path:
    old = Path(step.config.out).expanduser()
    suffix = SCORES_SUFFIX if old.name.endswith(SCORES_SUFFIX) else ""
    if not last:
        return out / "steps" / f"{n}-{step.command}{suffix}"
    name = old.name if old.name not in ("", ".", "..", "steps") else f"{step.command}{suffix}"
    return out / name


def _moved(artifact: str | None, old_out: str, new_out: Path) -> str:
    """Where the step's artifact lands: the new out, or the same place inside it (an arm)."""
    if artifact is None:
        return str(new_out)
    old = Path(old_out).expanduser().resolve()
    try:
        inside = Path(artifact).resolve().relative_to(old)
    except ValueError:
        return str(new_out)
    return str(new_out / inside) if inside.parts else str(new_out)


def plan(store: RunStore, run_id: int, out: str | Path) -> list[Step]:
    """chain(store, run_id) rewritten to write under `out` (see the module docstring)."""
    out = Path(out).expanduser()
    steps = chain(store, run_id)
    remade: dict[int, str] = {}  # recorded run id -> its artifact's new path
    planned = []
    for n, step in enumerate(steps, 1):
        cfg = step.config
        cwd = (step.run.get("config") or {}).get("cwd")
        changes = {name: remade[made_by] for name, made_by in step.needs.items()}
        if isinstance(getattr(cfg, "data", None), str):
            changes["data"] = _absolute_data(cfg.data, cwd)
        if hasattr(cfg, "resume"):
            changes["resume"] = False
        for name in getattr(cfg, "NOT_REPRODUCED", ()):  # e.g. the app's session: not the recipe
            changes[name] = next(f for f in dataclasses.fields(cfg) if f.name == name).default
        artifact = None
        if getattr(cfg, "out", None):
            new_out = _new_out(step, out, n, n == len(steps))
            old_out = str(Path(cwd or ".") / Path(cfg.out).expanduser())
            changes["out"] = str(new_out)
            artifact = _moved(step.artifact, old_out, new_out)
        remade[step.run["id"]] = artifact
        cfg = dataclasses.replace(cfg, **changes)
        planned.append(Step(step.run, step.command, cfg, step.needs, artifact))
    return planned


def script(store: RunStore, run_id: int, out: str | Path, program: str = "python -m compact") -> list[str]:
    """The plan as shell lines, one `python -m compact <command> ...` per step."""
    from compact.jobs import command_line

    return [command_line(step.config, program) for step in plan(store, run_id, out)]


def _direct(progress=None, should_stop=None):
    from compact.jobs import JOBS

    def runner(command: str, cfg) -> dict:
        return JOBS[command].run(cfg, progress=progress, should_stop=should_stop)

    return runner


def run(store: RunStore, run_id: int, out: str | Path, progress=None, should_stop=None, runner=None) -> dict:
    """Remake run_id's artifact under `out` (a new or empty folder); returns where each step wrote.

    runner(command, cfg) -> result runs one step (default: the job's library call; the CLI
    passes its recording run_job, so the remade steps are runs with their own lineage).
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not an empty folder: reproduce writes a new one")
    steps = plan(store, run_id, out)
    runner = runner or _direct(progress, should_stop)
    done = []
    result: dict = {}
    for n, step in enumerate(steps, 1):
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped before step {n} of {len(steps)}",
                            {"status": "cancelled", "steps": done})
        if progress is not None:
            progress((n - 1) / len(steps),
                     f"step {n}/{len(steps)}: {step.command} (remakes run {step.run['id']})")
        result = runner(step.command, step.config)
        done.append({"run": step.run["id"], "command": step.command, "artifact": step.artifact})
    return {"status": "done", "run": run_id, "reproduced": steps[-1].run["id"], "out": str(out),
            "artifact": steps[-1].artifact, "steps": done, "result": result}
