"""A responsive command line: parsing, --help, the listing commands and settings validation run with
torch and transformers made unimportable; the start-up benchmark reports its phases; the embedded
model loads as a plain transformers load of its checkpoint would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from icl_locate.cli import main

# A child interpreter in which the model stack cannot be imported at all.
REFUSE = textwrap.dedent("""
    import sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "ray", "matplotlib", "peft", "accelerate"}:
                raise ImportError(f"{name} is refused in this test")
    sys.meta_path.insert(0, Refuse())
    from icl_locate.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def without_model_stack(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", REFUSE, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], "usage: icl-locate"),
        (["sweep", "--help"], "--engine"),
        (["bench", "--help"], "--head"),
        (["run", "--help"], "--from-layer"),
        (["tasks"], "flores"),
        (["conditions"], "instructions+examples"),
        (["models"], "gemma-3-270m"),
    ],
)
def test_listing_and_help_import_no_torch(argv, expected):
    done = without_model_stack(*argv)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_the_refusing_hook_does_refuse():
    done = subprocess.run(
        [sys.executable, "-c", REFUSE.replace("from icl_locate.cli import main", "import torch")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "refused in this test" in done.stderr


def test_a_model_command_imports_only_what_it_needs():
    """The model commands import the API (and so the model stack), not what only some commands use:
    pandas (the Study's DataFrames), matplotlib (figures), peft (LoRA), ray (the Ray executor)."""
    check = (
        "import sys, icl_locate.api; "
        "extra = {'pandas', 'matplotlib', 'peft', 'ray'} & {m.split('.')[0] for m in sys.modules}; "
        "assert not extra, extra"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--store", "x.sqlite", "--conditions", "bogus"], "unknown condition"),
        (["sweep", "--store", "x.sqlite", "--dtype", "float8"], "unknown dtype"),
        (
            ["sweep", "--store", "x.sqlite", "--engine", "fast", "--head", "int8"],
            "--head int8 is for the tree engine",
        ),
        (["sweep", "--store", "x.sqlite", "--draft-tokens", "lots"], "--draft-tokens must be 'auto' or a number"),
        (["sweep", "--store", "x.sqlite", "--preset", "nope"], "unknown preset"),
    ],
)
def test_sweep_settings_are_validated_without_torch(argv, message):
    done = without_model_stack(*argv)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_startup_reports_every_phase_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "startup.json"
    assert main(["startup", "--model", "tiny:llama", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("help", "imports_cli", "imports_model_stack", "model_load", "first_token", "to_model_loaded"):
        assert data[key] > 0, key
    assert data["to_model_loaded"] >= data["model_load"]
    assert data["hardware"]["cpu_capability"]
    table = capsys.readouterr().out
    assert "start to model loaded" in table and "torch CPU capability" in table


@pytest.mark.slow
def test_the_embedded_model_loads_as_its_checkpoint_does(gemma):
    """load_model gives the weights and config a plain transformers load of the cached checkpoint gives."""
    import torch
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(gemma.info.source, dtype=torch.float32)
    ours = gemma.model.state_dict()
    theirs = plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    def settings(config) -> dict:  # the attention wiring is ours (icl_sdpa): everything else must agree
        return {k: v for k, v in config.to_dict().items() if "attn_implementation" not in k}

    assert settings(gemma.model.config) == settings(plain.config)


def _checkpoint_with_byte_tokenizer(directory):
    from icl_locate.core.models import byte_tokenizer

    byte_tokenizer().save_pretrained(directory)
    return directory


def test_a_checkpoint_tokenizer_loads_directly_only_after_it_was_compared(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from icl_locate.core import tokenizer_files
    from icl_locate.core.models import byte_tokenizer

    directory = _checkpoint_with_byte_tokenizer(tmp_path)
    auto_loads = []
    real_auto = AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        tokenizer_files.AutoTokenizer, "from_pretrained", lambda *a, **k: auto_loads.append(1) or real_auto(*a, **k)
    )
    direct_loads: list = []  # the direct loads, recorded to tell the two apart

    class RecordedFast(tokenizer_files.PreTrainedTokenizerFast):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            direct_loads.append(self)

    monkeypatch.setattr(tokenizer_files, "PreTrainedTokenizerFast", RecordedFast)
    prepare = lambda t: t  # noqa: E731
    first = tokenizer_files.load_tokenizer(directory, prepare)
    verdict = json.loads((directory / tokenizer_files.VERDICT).read_text())
    assert verdict["same"] and verdict["difference"] is None and len(auto_loads) == 1
    second = tokenizer_files.load_tokenizer(directory, prepare)
    assert len(auto_loads) == 1  # the verdict is trusted: no AutoTokenizer load
    assert first is direct_loads[0] and second is direct_loads[1]  # the comparing load returns the direct one too
    text = "Q: Bonjour ça va ?\nA: <eos> hello"
    expected = byte_tokenizer()(text)["input_ids"]
    assert first(text)["input_ids"] == second(text)["input_ids"] == expected

    # the tokenizer file changes: the old verdict no longer applies, so the loads are compared again
    (directory / "tokenizer_config.json").write_text(
        (directory / "tokenizer_config.json").read_text().replace("}", ', "model_max_length": 77}', 1)
    )
    tokenizer_files.load_tokenizer(directory, prepare)
    assert len(auto_loads) == 2
    assert json.loads((directory / tokenizer_files.VERDICT).read_text())["key"] != verdict["key"]


def test_a_direct_load_that_differs_is_refused_and_said(tmp_path, monkeypatch):
    from icl_locate.core import tokenizer_files

    directory = _checkpoint_with_byte_tokenizer(tmp_path)
    # the direct load drops the configured special tokens: its pad (EOS by the preparation) differs
    monkeypatch.setattr(tokenizer_files, "PASSED_SETTINGS", ())

    def prepare(t):
        if t.pad_token is None:
            t.pad_token = t.eos_token
        return t

    loaded = tokenizer_files.load_tokenizer(directory, prepare)
    verdict = json.loads((directory / tokenizer_files.VERDICT).read_text())
    assert verdict["same"] is False and "token" in verdict["difference"]
    assert loaded.pad_token == "<pad>"  # the AutoTokenizer load, not the direct one
    again = tokenizer_files.load_tokenizer(directory, prepare)
    assert again.pad_token == "<pad>"


@pytest.mark.slow
def test_the_embedded_tokenizer_loads_directly_and_tokenizes_as_its_class_does(gemma, data_dir):
    """The embedded checkpoint's verdict is 'same', and on FLORES text in every language the direct load
    (what load_model returned) gives the ids, offsets and decodings of transformers' own tokenizer class."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from icl_locate.core.tokenizer_files import VERDICT
    from icl_locate.tasks.data import flores_file, resolve_language

    directory = Path(gemma.info.source)
    assert json.loads((directory / VERDICT).read_text())["same"]
    reference = AutoTokenizer.from_pretrained(str(directory))
    assert type(reference).__name__ != type(gemma.tokenizer).__name__  # two different load paths compared
    for lang in ("eng_Latn", "fra_Latn", "por_Latn", "deu_Latn"):
        lines = flores_file(data_dir, resolve_language(lang), "dev").read_text(encoding="utf-8").splitlines()[:60]
        for text in lines:
            a = reference(text, return_offsets_mapping=True)
            b = gemma.tokenizer(text, return_offsets_mapping=True)
            assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"], text
            assert reference.decode(a["input_ids"]) == gemma.tokenizer.decode(a["input_ids"])
