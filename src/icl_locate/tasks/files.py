"""Reading a user's data files verbatim: JSONL, TSV and CSV records, nothing guessed, nothing dropped.

* Bytes are decoded as UTF-8, strictly: an undecodable byte is one error naming the file and its
  byte offset. A leading UTF-8 byte-order mark is removed; line ends may be LF or CRLF.
* TSV is split on tabs only, with no quote processing (a field may start with a quote, as quoted
  speech in MT data does); every line must have exactly the expected number of columns.
* CSV follows RFC 4180 quoting (that is what CSV means); every record must have the header's columns.
* JSONL: one JSON object per line; named fields must be present and be strings.
* Empty lines are skipped and counted; nothing else is ever skipped, merged or trimmed.

Each read returns the records (field -> text, with the physical line number) and a summary
line ``read N records from FILE`` for the user.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..util.errors import UserError

FORMATS = ("jsonl", "tsv", "csv")


@dataclass(frozen=True)
class Record:
    line: int  # physical line number (1-based) where the record starts
    fields: dict[str, str]


@dataclass
class Table:
    path: Path
    records: list[Record]
    empty_lines: int

    def summary(self, what: str = "records") -> str:
        skipped = f", {self.empty_lines} empty line{'s' * (self.empty_lines != 1)} skipped" if self.empty_lines else ""
        return f"read {len(self.records)} {what} from {self.path}{skipped}"


def file_format(path: Path, declared: str | None = None) -> str:
    fmt = declared or {
        ".jsonl": "jsonl",
        ".json": "jsonl",
        ".tsv": "tsv",
        ".tab": "tsv",
        ".csv": "csv",
        ".txt": "tsv",
    }.get(path.suffix.lower())
    if fmt not in FORMATS:
        raise UserError(f"{path}: cannot tell the format from the name; say format: jsonl, tsv or csv")
    return fmt


def read_text(path: Path) -> str:
    """The file as text: strict UTF-8, BOM removed, CRLF line ends as LF."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 at byte offset {err.start} (byte 0x{data[err.start]:02x})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n")


def read_table(
    path: str | Path, fields: dict[str, str | int], fmt: str | None = None, optional: frozenset[str] = frozenset()
) -> Table:
    """Records of ``path`` with ``fields`` (name -> JSON key or CSV column name, or 1-based TSV column).
    JSONL fields named in ``optional`` may be absent from a record."""
    path = Path(path)
    fmt = file_format(path, fmt)
    text = read_text(path)
    if fmt == "csv":
        return _read_csv(path, text, {k: v for k, v in fields.items() if k not in optional})
    records, empty = [], 0
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for n, line in enumerate(lines, 1):
        if line == "":
            empty += 1
            continue
        records.append(
            Record(
                n,
                _tsv_fields(path, n, line, {k: v for k, v in fields.items() if k not in optional})
                if fmt == "tsv"
                else _jsonl_fields(path, n, line, fields, optional),
            )
        )
    return Table(path, records, empty)


def _tsv_fields(path: Path, n: int, line: str, fields: dict[str, str | int]) -> dict[str, str]:
    columns = line.split("\t")
    width = max(int(c) for c in fields.values())
    if len(columns) != width:
        raise UserError(f"{path}:{n}: expected {width} tab-separated columns, found {len(columns)}")
    return {name: columns[int(c) - 1] for name, c in fields.items()}


def _jsonl_fields(
    path: Path, n: int, line: str, fields: dict[str, str | int], optional: frozenset[str] = frozenset()
) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{n}: not a JSON object ({err.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{path}:{n}: expected a JSON object, found {type(row).__name__}")
    out = {}
    for name, key in fields.items():
        if str(key) not in row and name in optional:
            continue
        if str(key) not in row:
            raise UserError(f"{path}:{n}: no field {key!r} (the {name})")
        value = row[str(key)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "id":
            value = str(value)
        if not isinstance(value, str):
            raise UserError(f"{path}:{n}: field {key!r} must be a string, found {type(value).__name__}")
        out[name] = value
    return out


def _read_csv(path: Path, text: str, fields: dict[str, str | int]) -> Table:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path} is empty") from None
    missing = [str(k) for k in fields.values() if str(k) not in header]
    if missing:
        raise UserError(f"{path}:1: no column {', '.join(map(repr, missing))} in the header {header}")
    index = {name: header.index(str(key)) for name, key in fields.items()}
    records, empty = [], 0
    try:
        for row in reader:
            n = reader.line_num
            if not row:
                empty += 1
                continue
            if len(row) != len(header):
                raise UserError(f"{path}:{n}: expected {len(header)} columns, found {len(row)}")
            records.append(Record(n, {name: row[i] for name, i in index.items()}))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: {err}") from None
    return Table(path, records, empty)


def parse_range(spec: str | int | None, what: str) -> tuple[int, int] | None:
    """'801-997' (1-based, inclusive) -> (801, 997); a single number is one record; None is everything."""
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        lo, _, hi = text.partition("-")
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"{what}: expected a range like 801-997, got {spec!r}") from None
    if not 1 <= first <= last:
        raise UserError(f"{what}: a range runs from 1 upwards, first <= last; got {spec!r}")
    return first, last


def select_range(items: list, bounds: tuple[int, int] | None, what: str, source: str) -> list:
    """Records first..last (1-based, inclusive) of ``items``; a range past the end is an error."""
    if bounds is None:
        return items
    first, last = bounds
    if last > len(items):
        raise UserError(f"{what} {first}-{last}: {source} has only {len(items)} records")
    return items[first - 1 : last]
