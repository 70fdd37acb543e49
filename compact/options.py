"""Each option declared once: a config dataclass field holds its default, help and choices.

From one config class come the command's flags (`add_arguments`), the config back from parsed
flags (`from_args`) and the flags that reproduce a config (`to_argv`; compact.jobs.command_line
makes the whole `python -m compact ...` line). Parsing that line gives an equal config back
(tests/test_options.py checks it for every job).
The app takes its widget defaults from the same fields (`default`).

A field is an option when declared with `option(...)`; plain fields (no metadata) are internal
and never become flags. Flag names are the field names with '-' for '_'.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, dataclass, field, fields

REQUIRED = MISSING


def option(default=REQUIRED, help: str = "", *, choices=None, positional: bool = False,
           metavar: str | None = None):
    """A config field that is also a command-line flag (or a positional argument)."""
    meta = {"option": True, "help": help, "choices": choices, "positional": positional,
            "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class LoadOptions:
    """How a job loads its models: shared by every command that loads one."""

    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: automatic)")
    dtype: str | None = option(None, "auto, float32, bfloat16 or float16 (default auto: bfloat16 on "
                                        "GPUs of compute capability 8.0+, float16 on older ones, "
                                        "float32 on CPU)")
    trust_remote_code: bool = option(False, "allow a model's own code to run")
    allow_pickle: bool = option(False, "allow loading pickle (.bin) weights")

    def load(self, ref: str, **override):
        """compact.models.load(ref) with these options (override: e.g. another device)."""
        from compact import models

        return models.load(ref, **{**dict(device=self.device, dtype=self.dtype,
                                          trust_remote_code=self.trust_remote_code,
                                          allow_pickle=self.allow_pickle), **override})


def options(cls_or_cfg) -> list[dataclasses.Field]:
    """The option fields, the job's own first, then the shared groups it inherits (for --help
    and for command lines that start with the model)."""
    cls = cls_or_cfg if isinstance(cls_or_cfg, type) else type(cls_or_cfg)
    mro = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]

    def owner(f: dataclasses.Field) -> int:
        return next(i for i, c in enumerate(mro) if f.name in c.__dict__.get("__annotations__", {}))

    return sorted((f for f in fields(cls) if f.metadata.get("option")), key=owner)


def default(cls, name: str):
    """The declared default of a field (for widgets); fails loudly on a required field."""
    f = next(f for f in fields(cls) if f.name == name)
    if f.default is MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return f.default


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(cls, f: dataclasses.Field) -> type:
    """int for 'int', 'int | None' and the like (annotations are strings here)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in options(cls):
        meta, kind = f.metadata, _base_type(cls, f)
        required = f.default is MISSING
        kw: dict = {"help": meta["help"] or None}
        if meta["choices"] is not None:
            kw["choices"] = list(meta["choices"])
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["positional"]:
            parser.add_argument(f.name, type=kind, **kw)
        elif kind is bool:
            action = argparse.BooleanOptionalAction if f.default is True else "store_true"
            parser.add_argument(flag(f.name), dest=f.name, action=action, default=f.default, **kw)
        else:
            parser.add_argument(flag(f.name), dest=f.name, type=kind, required=required,
                                default=None if required else f.default, **kw)


def from_args(cls, namespace: argparse.Namespace):
    return cls(**{f.name: getattr(namespace, f.name) for f in options(cls)})


def to_argv(cfg) -> list[str]:
    """The flags that give cfg back: positionals, required options, and what differs from the default."""
    argv: list[str] = []
    for f in options(cfg):
        value = getattr(cfg, f.name)
        if f.metadata["positional"]:
            argv.append(str(value))
        elif value is None:
            continue
        elif isinstance(value, bool):
            if value != f.default:
                argv.append(flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif f.default is MISSING or value != f.default:
            argv += [flag(f.name), str(value)]
    # A non-option field that differs from its default cannot be reproduced: say so loudly.
    lost = [f.name for f in fields(cfg) if not f.metadata.get("option")
            and f.default is not MISSING and getattr(cfg, f.name) != f.default
            and f.name not in getattr(cfg, "NOT_REPRODUCED", ())]
    if lost:
        raise ValueError(f"{type(cfg).__name__} fields {lost} have no flag and differ from their defaults")
    return argv
