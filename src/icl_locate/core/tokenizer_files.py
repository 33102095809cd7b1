"""A checkpoint's tokenizer loaded straight from its ``tokenizer.json`` where that is shown to be the same.

``AutoTokenizer`` builds a model's tokenizer class (``GemmaTokenizer``, ...), and in transformers 5 such a
class rebuilds the tokenizer from the vocabulary and merges in Python, a cost that grows with the vocabulary
(262k tokens for Gemma 3) and is paid by every command and every sweep worker. The same file loads into
``PreTrainedTokenizerFast`` directly, in the Rust library alone. Whether the two tokenize alike is not
assumed: the first load of a checkpoint under given library versions loads both, compares them on ``PROBES``
(ids, offsets, decoding, padding, special tokens), writes the verdict beside the checkpoint and returns the
direct load where they are the same. Later loads take the direct path only under a verdict of "same" for the
same tokenizer files and the same library versions; anything else loads through ``AutoTokenizer``.

Used for the checkpoints icl-locate builds itself (the embedded model, dequantized .gguf files), whose
directory it owns; a hub model or a user's directory always loads through ``AutoTokenizer``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..util.fileio import file_sha256, write_json_atomic

VERDICT = "tokenizer-check.json"
# The settings of tokenizer_config.json that PreTrainedTokenizerFast takes as they are.
PASSED_SETTINGS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "mask_token",
    "model_max_length",
    "clean_up_tokenization_spaces",
    "padding_side",
)

# Texts the two loads must tokenize alike: the prompt format, the FLORES languages with their accents,
# code (indentation, tabs), whitespace runs, special-token strings inside text, emoji, scripts beyond
# Latin, and the empty string.
PROBES = (
    "",
    " ",
    "Translate French to English:\nQ: Bonjour, comment ça va ?\nA: Hello, how are you?\nQ: Merci.\nA:",
    "Le président a déclaré : « Nous n'avons pas d'œufs ».",
    "A reunião começou às 9h; não há pão.",
    "Über die Straße gehen größere Mädchen.",
    "def add(a, b):\n    return a + b\n\n\tif x  ==  1:\n\t\tpass  # tab\r\n",
    "  two leading spaces,   three inside, trailing   ",
    "<bos>literal <eos> and <pad><start_of_turn>user\n",
    "emoji 😀👍🏽 and CJK 在上下文中学习 and عربى",
    "x" * 300,
    "1234567890 3.14159 1e-9 $100 50% #hash @user",
)


def load_tokenizer(directory: Path, prepare: Callable) -> object:
    """The tokenizer of ``directory`` (a checkpoint icl-locate built), ``prepare``d for batching.

    ``prepare`` sets padding and the pad token; both loads get it before they are compared.
    """
    key = _verdict_key(directory)
    verdict = _read_verdict(directory)
    if verdict is not None and verdict.get("key") == key and verdict.get("same"):
        return prepare(_direct(directory))
    reference = prepare(AutoTokenizer.from_pretrained(str(directory)))
    if verdict is None or verdict.get("key") != key:
        direct = prepare(_direct(directory))
        difference = _difference(reference, direct)
        with contextlib.suppress(OSError):  # a read-only cache: the next load compares again
            write_json_atomic(directory / VERDICT, {"key": key, "same": difference is None, "difference": difference})
        if difference is None:  # what every later load returns: one tokenizer whatever the cache held before
            return direct
    return reference


def _direct(directory: Path) -> PreTrainedTokenizerFast:
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    passed = {name: settings[name] for name in PASSED_SETTINGS if name in settings}
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **passed)


def _verdict_key(directory: Path) -> dict:
    return {
        "tokenizer.json": file_sha256(directory / "tokenizer.json"),
        "tokenizer_config.json": file_sha256(directory / "tokenizer_config.json"),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _read_verdict(directory: Path) -> dict | None:
    try:
        return json.loads((directory / VERDICT).read_text())
    except (OSError, ValueError):
        return None


def _difference(reference, direct) -> str | None:
    """None when ``direct`` behaves as ``reference`` on every probe; else the first difference, in words."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side"):
        if getattr(reference, name) != getattr(direct, name):
            return f"{name}: {getattr(reference, name)!r} != {getattr(direct, name)!r}"
    if sorted(reference.all_special_ids) != sorted(direct.all_special_ids) or len(reference) != len(direct):
        return "special tokens or vocabulary size differ"
    for text in PROBES:
        for special in (True, False):
            a = reference(text, return_offsets_mapping=True, add_special_tokens=special)
            b = direct(text, return_offsets_mapping=True, add_special_tokens=special)
            if a["input_ids"] != b["input_ids"] or a["offset_mapping"] != b["offset_mapping"]:
                return f"encoding of {text[:40]!r} (add_special_tokens={special})"
            for skip in (False, True):
                if reference.decode(a["input_ids"], skip_special_tokens=skip) != direct.decode(
                    a["input_ids"], skip_special_tokens=skip
                ):
                    return f"decoding of {text[:40]!r} (skip_special_tokens={skip})"
    batch = list(PROBES[2:5])
    if dict(reference(batch, padding=True)) != dict(direct(batch, padding=True)):
        return "padded batch"
    return None
