"""Model loading: specs, errors, the checkpoint cache."""

from __future__ import annotations

import errno
import os
import time

import gguf
import numpy as np
import pytest
import torch

from icl_locate.core.checkpoints import build_checkpoint, checkpoint_ok
from icl_locate.core.interventions import is_prepared
from icl_locate.core.models import ALIASES, load_model
from icl_locate.util.errors import UserError


def test_tiny_model_description():
    lm = load_model("tiny:gpt_neo")
    assert lm.info.num_layers == 4 and lm.info.model_type == "gpt_neo" and lm.info.dtype == "float32"
    assert not lm.model.training and is_prepared(lm.model)
    assert lm.tokenizer("ab")["input_ids"][0] == lm.tokenizer.bos_token_id


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no/such-model-xyz", "cannot load 'no/such-model-xyz' from the Hugging Face hub"),
        ("missing.gguf", "GGUF file not found"),
        ("tiny:nope", "unknown tiny family"),
        ("not a model", "neither a local path"),
    ],
)
def test_bad_specs_give_clear_errors(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message):
        load_model(spec)


def test_paper_alias_offline_names_hub_id_and_local_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_model("llama-3.1-8b")
    assert ALIASES["llama-3.1-8b"] in str(err.value) and "--model DIR" in str(err.value)
    assert "\n" not in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_checkpoint_directory_round_trip(tmp_path):
    lm = load_model("tiny:llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits)


def test_checkpoint_cache_detects_partial_and_corrupt_files(tmp_path):
    target = tmp_path / "ckpt"
    builds = []

    def build(d):
        builds.append(1)
        (d / "model.safetensors").write_bytes(os.urandom(4096))
        (d / "config.json").write_text("{}")

    build_checkpoint(target, build, source_hash="x")
    assert checkpoint_ok(target) and len(builds) == 1
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # corrupt, same size
    time.sleep(0.01)
    weights.write_bytes(bytes(data))
    assert not checkpoint_ok(target)
    build_checkpoint(target, build, source_hash="x")
    assert checkpoint_ok(target) and len(builds) == 2
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert not checkpoint_ok(target)
    (target / "icl-locate-manifest.json").unlink()  # interrupted build
    assert not checkpoint_ok(target)


def test_a_gguf_file_that_cannot_be_read_is_one_clear_error(tmp_path, monkeypatch, refuse_reading):
    """Not a GGUF file at all, or one whose architecture transformers cannot read: a UserError naming the file,
    and no model cache left behind."""
    monkeypatch.setenv("ICL_LOCATE_CACHE", str(tmp_path / "cache"))
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(1024))
    with pytest.raises(UserError, match="noise.gguf is not a GGUF file"):
        load_model(str(noise))
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=f"cannot load {odd}: .*nosucharch"):
        load_model(str(odd))
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    refuse_reading("open", odd)
    with pytest.raises(UserError, match=f"cannot read {odd} \\(Permission denied\\)"):
        load_model(str(odd))


def test_a_model_cache_that_cannot_be_written_is_one_clear_error(tmp_path):
    """An unwritable cache directory (here: a path through a file) or a full disk during the build: a UserError
    that says what to set, and no half-built directory left; any other failure of the build is not hidden."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the model cache in .*a-file.*ICL_LOCATE_CACHE"):
        build_checkpoint(blocker / "models" / "ckpt", lambda d: None, source_hash="x")

    class SafetensorError(Exception):  # safetensors' own error wraps the OS's (its base class is Exception)
        pass

    target = tmp_path / "models" / "ckpt"
    for full in (
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'),
    ):

        def fills_the_disk(d, full=full):
            (d / "model.safetensors").write_bytes(b"0" * 64)
            raise full

        with pytest.raises(UserError, match="no room for the model cache .*full.*ICL_LOCATE_CACHE"):
            build_checkpoint(target, fills_the_disk, source_hash="x")
        assert list((tmp_path / "models").iterdir()) == []

    def breaks(d):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        build_checkpoint(target, breaks, source_hash="x")


def test_the_cli_says_where_the_model_cache_cannot_be_written(data_dir, tmp_path, monkeypatch, capsys):
    from icl_locate.cli import main

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ICL_LOCATE_CACHE", str(tmp_path / "a-file" / "cache"))
    assert main(["run", "--pair", "fra-eng", "--n-test", "1", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the model cache" in err and err.count("\n") == 1 and "Traceback" not in err
