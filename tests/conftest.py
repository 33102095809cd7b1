"""Shared fixtures and helpers: the offline data directory, the embedded model, tiny random models, a headless
Chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Tests never touch the network: the hub client reads this at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    env = os.environ.get("ICL_LOCATE_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (candidate / "flores200").is_dir() or (candidate / "mbpp").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if path is None:
        pytest.skip("no FLORES/MBPP data: set ICL_LOCATE_DATA_DIR (CI sets it to ../shared/data)")
    return path


_TINY: dict = {}


@pytest.fixture(autouse=True)
def _no_kept_screens():
    """Each test starts with no screen kept from another (the models loaded once are shared between tests)."""
    from icl_locate.engines.screens import forget_kept_screens

    forget_kept_screens()
    yield
    forget_kept_screens()


@pytest.fixture
def refuse_reading(monkeypatch):
    """``refuse_reading(method, path)``: ``Path.<method>`` raises PermissionError for ``path`` alone, as for a file
    another user owns (the tests run as root, whom no permission bits refuse)."""

    def refuse(method: str, refused: Path) -> None:
        real = getattr(Path, method)

        def guarded(path, *args, **kwargs):
            if path == refused:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(Path, method, guarded)

    return refuse


def tiny(family: str, attn: str | None = None):
    """A tiny random model of ``family`` (``tiny:<family>``), loaded once per session and attention
    implementation; tests import it (``from conftest import tiny``) to share the loaded models."""
    from icl_locate.core.models import load_model

    if (family, attn) not in _TINY:
        _TINY[(family, attn)] = load_model(f"tiny:{family}", attn_implementation=attn)
    return _TINY[(family, attn)]


def tiny_worker(config, fast_engine: bool = False, **options):
    """A sweep ``Worker`` for ``config`` (model ``tiny:<family>``, shared through ``tiny``) with its task
    data loaded; ``fast_engine``: every unit on the fast engine instead of a measured choice."""
    from icl_locate.engines.fast import FastEngine
    from icl_locate.experiments.settings import load_task_data
    from icl_locate.experiments.units import Worker

    loaded = tiny(config.model.removeprefix("tiny:"))
    if fast_engine:
        options["engine"] = FastEngine(loaded.model, loaded.tokenizer)
    return Worker(loaded, load_task_data(config), **options)


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma-3-270M (built into the user cache on first use)."""
    from icl_locate.core.models import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def bpe_tokenizer(data_dir):
    """A GPT-2-style byte-level BPE trained on FLORES dev text (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from icl_locate.tasks.data import flores_file, resolve_language

    lines = []
    for lang in ("eng_Latn", "fra_Latn", "por_Latn"):
        lines += flores_file(data_dir, resolve_language(lang), "dev").read_text(encoding="utf-8").splitlines()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(lines + ["Translate French to English:\nQ:A:\n"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


# The attention output projection of each tiny family, written out by hand (not taken from core/structure.py)
# so that tests can hook or zero it as an independent reference: its input is the heads' outputs side by side.
OUT_PROJ = {
    "llama": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "starcoder2": "self_attn.o_proj",
    "gemma3": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "gpt2": "attn.c_proj",
    "gpt_neox": "attention.dense",
    "gpt_neo": "attn.attention.out_proj",
    "bloom": "self_attention.dense",
}


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Playwright: Debian's ``chromium`` (``make test`` installs it with apt), or
    the one ``$ICL_LOCATE_CHROMIUM`` names. Missing, the tests that use it skip with the reason, or fail under
    ``CI=true``: CI must run them."""
    path = os.environ.get("ICL_LOCATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed (pip install -e '.[test]')")
        raise
    if path is None:
        _no_browser("no chromium on PATH (make test installs it: apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path)
        yield launched
        launched.close()


def _no_browser(reason: str) -> None:
    """Skip the browser tests, saying why; under ``CI=true`` fail them instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)
