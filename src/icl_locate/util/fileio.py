"""Files written all-or-nothing, writability checked before work, and content hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def not_a_directory(path: Path) -> str:
    """Why ``path`` cannot hold a file: it does not exist, or it is something else (a file)."""
    return f"{path} is not a directory" if path.exists() else f"directory {path} does not exist"


def check_writable(path: str | Path) -> Path:
    """Fail before any work if ``path`` cannot be written."""
    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: {not_a_directory(parent)}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: directory {parent} is not writable")
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory")
    return out


def ensure_dir(path: str | Path) -> Path:
    """Create a directory (and parents), one error line if that is impossible."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}") from None
    return out


def write_atomic(path: str | Path, text: str) -> None:
    """All of ``text`` or nothing: write beside, then rename (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_ready(value: Any) -> Any:
    """``value`` as standard JSON can hold it: NaN and infinities (a figure skipped or undefined, e.g. (a) under
    ``bench --skip-paper``) as null, which every JSON reader takes (Python's NaN literal is not JSON), numpy and
    torch scalars as the Python numbers they hold, and any other number as a float."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if callable(getattr(value, "item", None)):
        value = value.item()  # a numpy or torch scalar: the Python number it holds (an int stays an int)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def write_jsonl_atomic(path: str | Path, rows: Sequence[dict]) -> None:
    write_atomic(path, "".join(json.dumps(json_ready(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows))


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_atomic(path, json.dumps(json_ready(data), indent=1, allow_nan=False))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_yaml_mapping(path: str | Path, what: str, empty_ok: bool = False) -> tuple[dict, bytes]:
    """A YAML file that must hold a mapping, and its bytes; one error line for each way it can be wrong.

    ``what`` completes the error when the file holds something else ("a task file holds a mapping ...");
    ``empty_ok``: an empty file is an empty mapping.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    try:
        loaded = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 at byte offset {err.start}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is None and empty_ok:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: {what}")
    return loaded, data
