"""What every experiment wires the same way: the model, prompts with their hidden columns,
the context-length check, the study fingerprint and provenance."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from .. import __version__
from ..core.conditions import Condition, MaskedPrompt, get_condition
from ..core.models import LoadedModel
from ..core.prompts import PromptedItem
from ..engines.base import StopRule
from ..results.store import study_fingerprint
from ..tasks.spec import Task
from ..util.errors import UserError
from ..util.fileio import file_sha256


def masked_prompts(items: Sequence[PromptedItem], condition: Condition | None) -> list[MaskedPrompt]:
    """Each item's prompt with the columns ``condition`` hides (None: nothing)."""
    return [MaskedPrompt.of(it.encoded, condition) for it in items]


def layer_from_condition(name: str, command: str) -> Condition:
    """A condition for a command that masks from a layer on (bench, prune, head sweeps): not a converse window."""
    condition = get_condition(name)
    if condition.window != "from":
        raise UserError(f"{command} masks the context from a layer on; {name} hides it below j (drop '-below')")
    return condition


def stop_rule(task: Task, max_new_tokens: int | None = None) -> StopRule:
    """The task's stop strings and token limit (``max_new_tokens`` overrides the limit)."""
    return StopRule(task.stop_strings, max_new_tokens or task.max_new_tokens)


def check_context(
    items: Sequence[PromptedItem] | Sequence[MaskedPrompt], loaded: LoadedModel, max_new_tokens: int, what: str = ""
) -> None:
    """Prompt + answer must fit the model's context, checked before any decoding (prompted items, or prompts)."""
    limit = loaded.info.context_length
    longest = max(len(it.encoded.ids) for it in items)
    if limit and longest + max_new_tokens > limit:
        raise UserError(
            f"{what + ': ' if what else ''}prompt of {longest} tokens + {max_new_tokens} new tokens "
            f"exceeds the model's context of {limit}; use fewer examples (--k) or a shorter "
            f"--max-new-tokens"
        )


def fingerprint(loaded: LoadedModel, max_new_tokens: int | None = None) -> dict:
    return study_fingerprint(loaded.info.spec, loaded.info.source, loaded.info.dtype, max_new_tokens)


def provenance(loaded: LoadedModel, data_files: Sequence[Path]) -> dict:
    """Versions, platform, model identity and data hashes, stored with every run."""
    return dict(
        icl_locate=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        platform=platform.platform(),
        model=loaded.info.as_dict(),
        model_files=_model_file_hashes(loaded.info.source),
        data_files={str(p): file_sha256(p) for p in data_files if Path(p).is_file()},
    )


def _model_file_hashes(source: str) -> dict:
    """Identity of a local checkpoint: its manifest (embedded/GGUF cache) or config hash; hub ids keep the revision."""
    path = Path(source)
    if not path.is_dir():
        return {}
    manifest = path / "icl-locate-manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    return {
        p.name: {"size": p.stat().st_size, **({"sha256": file_sha256(p)} if p.suffix == ".json" else {})}
        for p in sorted(path.iterdir())
        if p.is_file()
    }
