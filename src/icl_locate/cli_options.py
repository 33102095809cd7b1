"""Option groups several commands share (model and data, engine, executor): one place for each flag's
help, with defaults read from the settings dataclasses."""

from __future__ import annotations

import argparse

from .cli_values import default
from .core.catalog import EMBEDDED
from .engines.request import HEADS
from .experiments.options import EXECUTORS, ExecutorSettings, RaySettings
from .experiments.settings import SweepConfig

MODEL_HELP = f"alias, hub id, local dir, .gguf file or tiny:<family> (default {EMBEDDED})"
TASK_HELP = f"task name (see `icl-locate tasks`) or task file (.yaml); default {default(SweepConfig, 'task')}"
INSTRUCTIONS = {(True,): "yes", (False,): "no", (True, False): "both"}


def listed(name: str) -> str:
    """A SweepConfig list field's default as the comma list the flag takes."""
    return ",".join(map(str, SweepConfig.__dataclass_fields__[name].default_factory()))


def add_study_options(parser: argparse.ArgumentParser, cls, condition: str = "masking condition") -> None:
    """--model, --task, --pair, --condition, --n-test, --k, --seed of bench and prune, defaults from ``cls``."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--task", default=None, help=TASK_HELP)
    parser.add_argument("--pair", default=None, help=f"translation direction [{default(cls, 'pair')}]")
    parser.add_argument("--condition", default=None, help=f"{condition} [{default(cls, 'condition')}]")
    parser.add_argument(
        "--n-test", type=int, default=None, help=f"use the first N test items [{default(cls, 'n_test')}]"
    )
    parser.add_argument("--k", type=int, default=None, help=f"number of in-context examples [{default(cls, 'k')}]")
    parser.add_argument(
        "--seed", type=int, default=None, help=f"seed for sampling the examples [{default(cls, 'seed')}]"
    )


def add_data_and_device_options(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --dtype, --device: the same for every command that loads a model and data."""
    parser.add_argument("--data-dir", default=None, help="data directory (default $ICL_LOCATE_DATA_DIR)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")


def add_own_data_options(parser: argparse.ArgumentParser) -> None:
    """Your own translation pairs with the built-in bitext task (task files name their data themselves)."""
    parser.add_argument("--bank", help="bitext task: prompt-bank file (JSONL, TSV or CSV)")
    parser.add_argument("--test", help="bitext task: test file (JSONL, TSV or CSV)")
    parser.add_argument(
        "--src-lang", help="bitext task: source language (name or FLORES code): the paper's 'Translate X to Y:' format"
    )
    parser.add_argument("--tgt-lang", help="bitext task: target language")


def add_head_option(parser: argparse.ArgumentParser, whose: str) -> None:
    """--head: the LM head picking greedy tokens (``whose``, e.g. "tree engine's LM head"), measured unless forced."""
    parser.add_argument(
        "--head",
        default=None,
        choices=list(HEADS),
        help=f"{whose}: auto (default, measured), screen (the screen measured fastest, even where the plain head "
        "is faster), bf16, int8 or int8-linear (that screen + exact candidates; pays where its product is fast), "
        "plain (the "
        "model's own); same tokens",
    )


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The engine's hardware-dependent choices: measured on this machine and model unless forced."""
    parser.add_argument(
        "--engine",
        default=None,
        choices=["auto", "tree", "fast"],
        help="auto (default): the faster on this machine, measured at start (cached); tree: shares "
        "every layer below a row's mask layer; fast: shares the context's KV cache across rows; "
        "same generations",
    )
    add_head_option(parser, "tree engine's LM head")
    parser.add_argument(
        "--draft-tokens",
        default=None,
        help="tree engine: auto (default: drafts only where a decoding step fed a few more tokens costs "
        "about one fed one, measured) or N: verify drafts of up to N tokens per step (0: none)",
    )


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """Where units are computed: here (default) or on Ray workers (pip install 'icl-locate[ray]')."""
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="local: this process; ray: Ray actors, each loading the model once "
        f"[{default(ExecutorSettings, 'executor')}]",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="default: start a local Ray instance; 'auto': join the running cluster; or its address",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help=f"ray: number of workers (actors) [{default(RaySettings, 'workers')}]"
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help=f"ray: CPUs reserved per worker [{default(RaySettings, 'cpus_per_worker')}]",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="ray: GPUs per worker; fractions (0.25) pack small models several to a GPU "
        f"[{default(RaySettings, 'gpus_per_worker')}]",
    )
