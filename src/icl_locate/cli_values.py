"""The command line's values: a parser that fails in one line, and arguments turned into settings.

``cli_args`` builds the parser with these; ``cli`` turns what it parsed into settings with them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .experiments.options import ExecutorSettings, RaySettings
from .experiments.settings import SweepConfig, load_config, validate
from .util.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def settings_from(args: argparse.Namespace, cls, rename: dict[str, str] | None = None, **extra):
    """The dataclass ``cls`` filled from same-named arguments (``rename``: argument -> field)."""
    names = set(cls.__dataclass_fields__)
    # an option left out (None) keeps the settings' own default
    values = {(rename or {}).get(k, k): v for k, v in vars(args).items() if v is not None}
    return cls(**({k: v for k, v in values.items() if k in names} | extra))


def default(cls, name: str) -> str:
    """The default a settings dataclass gives ``name``, for help text: argparse itself defaults to None
    (an option left out), so that the dataclass is the one place the default is written."""
    return str(cls.__dataclass_fields__[name].default)


def csv_list(value: str | None, cast: Callable = str) -> list | None:
    if value is None:
        return None
    try:
        return [cast(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad list {value!r}") from None


def sweep_config_from_args(args) -> SweepConfig:
    """Preset, then YAML, then the flags given (a flag left out keeps the preset's or YAML's value)."""
    overrides = {name: getattr(args, name) for name in SweepConfig.__dataclass_fields__ if hasattr(args, name)}
    overrides |= dict(
        pairs=csv_list(args.pairs),
        conditions=csv_list(args.conditions),
        instructions={None: None, "yes": [True], "no": [False], "both": [True, False]}[args.instructions],
        labels=csv_list(args.labels),
        seeds=csv_list(args.seeds, int),
        ks=csv_list(args.ks, int),
        layer_ablation=True if args.layer_ablation else None,
    )
    return load_config(args.preset, args.config, overrides)


def validated_sweep_config(args) -> SweepConfig:
    """The sweep's settings from the arguments, validated (before the model stack is imported)."""
    config = sweep_config_from_args(args)
    validate(config)
    return config


def ray_settings(args) -> RaySettings | None:
    """RaySettings, or None for the local executor."""
    if settings_from(args, ExecutorSettings).executor != "ray":
        return None
    return settings_from(args, RaySettings, rename={"ray_address": "address"})
