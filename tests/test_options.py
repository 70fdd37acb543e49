"""Each option declared once: flags come from the config fields, and a config's command line
parses back to an equal config, for every job."""

from __future__ import annotations

import dataclasses

import pytest

from compact import jobs, options
from compact.errors import UserError


def _other_value(cls, f):
    """A value of the field's type that differs from its default."""
    kind = options._base_type(cls, f)
    choices = f.metadata["choices"]
    if choices:
        return next(c for c in choices if c != f.default)
    if kind is bool:
        return not f.default
    if kind is int:
        return (f.default or 0) + 3
    if kind is float:
        return (f.default or 0.0) + 0.125
    return f"some value with spaces & 'quotes' {f.name}"


def _required(cls) -> dict:
    return {f.name: _other_value(cls, f) for f in options.options(cls) if f.default is dataclasses.MISSING}


@pytest.mark.parametrize("name", sorted(jobs.JOBS))
def test_command_line_round_trips(name):
    cls = jobs.JOBS[name].config
    plain = cls(**_required(cls))
    assert jobs.parse_command_line(jobs.command_line(plain)) == plain
    changed = cls(**{f.name: _other_value(cls, f) for f in options.options(cls)})
    line = jobs.command_line(changed)
    assert line.startswith(f"python -m compact {name} ")
    assert jobs.parse_command_line(line) == changed
    # every option really is a flag (or the positional): nothing is left at its default
    assert all(getattr(changed, f.name) != f.default for f in options.options(cls))


def test_flags_are_generated_from_the_fields():
    parser = __import__("compact.cli", fromlist=["build_parser"]).build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name, job in jobs.JOBS.items():
        dests = {a.dest for a in sub[name]._actions} - {"help"}
        assert dests == {f.name for f in options.options(job.config)}, name


def test_a_field_without_a_flag_must_stay_at_its_default():
    from compact.experiments import ExperimentConfig

    cfg = ExperimentConfig(session="abc")  # the app's session is not part of the recipe
    assert "abc" not in jobs.command_line(cfg)
    with pytest.raises(KeyError):
        options.default(jobs.JOBS["prune"].config, "model")


def test_defaults_for_widgets_come_from_the_configs():
    from compact.distill import DistillConfig
    from compact.sparsify import SparsifyConfig

    assert options.default(DistillConfig, "tokens") == DistillConfig(teacher="t", student="s").tokens
    assert options.default(SparsifyConfig, "kd_weight") == 0.67  # AST's own loss mix


def test_bad_command_lines_are_user_errors():
    with pytest.raises(UserError):
        jobs.parse_command_line("python -m compact prune --model default --layers many")


def test_compile_recorded_as_true_or_false_reads_as_its_mode():
    # runs recorded before --compile took off|layers|model stored a bool (the runs store keeps them)
    from compact.distill import DistillConfig
    from compact.sparsify import SparsifyConfig

    assert DistillConfig(teacher="t", student="s", compile=True).compile == "model"
    assert DistillConfig(teacher="t", student="s", compile=False).compile == "off"
    assert SparsifyConfig(model="m", out="o", method="ast", compile=True).compile == "model"
    with pytest.raises(UserError, match="unknown --compile 'fast'"):
        DistillConfig(teacher="t", student="s", out="o", compile="fast").check()
