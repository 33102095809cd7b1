"""The results store: one SQLite file per study (one model); every table is read and written here.

Every prediction is kept (prompt token ids, hidden ranges, generation, reference, sentence
scores) with the run's provenance; a layer or head sweep's unit also keeps each test item's prompt text
and the character range of each of its tokens (``prompts``), so that a report can show the prompt with
the hidden tokens marked without a tokenizer (stores written before that table have none). A work unit
commits in one transaction, so a killed sweep leaves either the whole unit or nothing; rerunning skips
finished units. Concurrent sweeps on one store are safe: SQLite's WAL mode serialises writers, a unit
is committed only if no one committed it first, and live claims keep two processes from computing the
same unit.

Study identity (one rule, ``Store.open``): a store is fixed at creation to a fingerprint (the
model, its source, its dtype, the sweep's token limit). A sweep must match it exactly, since its
rows are only comparable under the same settings; an extra measurement attached to a study
(context pruning, LoRA) must match the model identity (``MODEL_IDENTITY``), and records its own
settings beside its result.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..util.errors import UserError
from ..util.fileio import not_a_directory

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, host TEXT, pid INTEGER,
    command TEXT, config TEXT, provenance TEXT);
CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY, run_id INTEGER, spec TEXT NOT NULL, finished REAL NOT NULL, seconds REAL,
    context_tokens REAL, query_tokens REAL);
CREATE TABLE IF NOT EXISTS claims (unit_id TEXT PRIMARY KEY, host TEXT, pid INTEGER, since REAL);
CREATE TABLE IF NOT EXISTS scores (
    unit_id TEXT NOT NULL, variant TEXT NOT NULL, layer INTEGER NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (unit_id, variant, layer, metric));
CREATE TABLE IF NOT EXISTS predictions (
    unit_id TEXT NOT NULL, item INTEGER NOT NULL, example_id TEXT NOT NULL, variant TEXT NOT NULL,
    layer INTEGER NOT NULL, prompt_token_ids TEXT, hidden_ranges TEXT, in_context_ids TEXT,
    raw_generation TEXT, generation TEXT, reference TEXT, finish TEXT, sentence_score REAL, stats TEXT,
    n_instructions INTEGER, n_examples INTEGER, n_query INTEGER,
    PRIMARY KEY (unit_id, item, variant, layer));
CREATE TABLE IF NOT EXISTS prompts (
    unit_id TEXT NOT NULL, item INTEGER NOT NULL, text TEXT NOT NULL, token_offsets TEXT NOT NULL,
    PRIMARY KEY (unit_id, item));
CREATE TABLE IF NOT EXISTS lora (
    unit_id TEXT NOT NULL, layer INTEGER NOT NULL, metric TEXT NOT NULL, value REAL, curve TEXT,
    adapter_path TEXT, PRIMARY KEY (unit_id, layer, metric));
CREATE TABLE IF NOT EXISTS audits (
    unit_id TEXT NOT NULL, item INTEGER NOT NULL, variant TEXT NOT NULL, layer INTEGER NOT NULL, agree INTEGER,
    position INTEGER, margin REAL, threshold REAL, fault INTEGER, seed TEXT,
    PRIMARY KEY (unit_id, item, variant, layer));
CREATE TABLE IF NOT EXISTS pruning (
    measured REAL NOT NULL, run_id INTEGER, task TEXT, pair TEXT, condition TEXT, from_layer INTEGER, data TEXT);
"""


MODEL_IDENTITY = ("model", "model_source", "dtype")


def study_fingerprint(spec: str, source: str, dtype: str, max_new_tokens: int | None = None) -> dict:
    """What a study store is fixed to at creation: the model, its dtype, the sweep's token limit."""
    return dict(model=spec, model_source=Path(source).name, dtype=dtype, max_new_tokens=max_new_tokens)


class Store:
    """A study's SQLite store. ``fingerprint`` (model identity, engine settings) is fixed at creation."""

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict, attach: bool = False) -> Store:
        """The study store at ``path`` for ``fingerprint``: created (or resumed) by a sweep; with ``attach``
        it must exist already and only the model identity must match (extra measurements)."""
        if not attach:
            return cls(path, fingerprint)
        store = cls(path, create=False)
        stored = store.fingerprint()
        for key in MODEL_IDENTITY:
            if key in stored and stored[key] != fingerprint.get(key):
                store.close()
                raise UserError(f"store {path} holds {key} {stored[key]!r}, this run uses {fingerprint.get(key)!r}")
        return store

    def __init__(self, path: str | Path, fingerprint: dict | None = None, create: bool = True):
        self.path = Path(path).expanduser()
        if not self.path.exists() and not create:
            raise UserError(f"store {self.path} does not exist")
        if self.path.exists() and self.path.is_dir():
            raise UserError(f"store {self.path} is a directory")
        parent = self.path.parent
        if not parent.is_dir():
            raise UserError(f"cannot create store {self.path}: {not_a_directory(parent)}")
        if not self.path.exists() and not os.access(parent, os.W_OK):
            raise UserError(f"cannot create store {self.path}: directory {parent} is not writable")
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._set_up()
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path} is not a usable icl-locate store ({err})") from None
        if fingerprint is not None:
            self._check_fingerprint(fingerprint)

    def _set_up(self, patience: float = 60.0) -> None:
        """WAL mode and the tables. Two processes may create one store at once: the tables are created in
        a write transaction taken first (a read of the schema upgraded to a write fails at once, not after
        the busy timeout, when the other process wrote in between), and a locked database is tried again
        for ``patience`` seconds (switching a new file to WAL can meet the other's lock too)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA busy_timeout=60000")
                self.db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
                return
            except sqlite3.OperationalError as err:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _check_fingerprint(self, fingerprint: dict) -> None:
        stored = self.meta("fingerprint")
        wanted = json.dumps(fingerprint, sort_keys=True)
        if stored is None:
            with self.transaction():
                if self.meta("fingerprint") is None:
                    self.db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (wanted,))
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            stored = self.meta("fingerprint")
            assert stored is not None  # written just above, or by the process that got there first
        if stored != wanted:
            old, new = json.loads(stored), fingerprint
            diff = ", ".join(
                f"{k}: {old.get(k)!r} (store) vs {new.get(k)!r} (now)"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            )
            raise UserError(f"store {self.path} was written with other settings ({diff}); use another --store")

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def fingerprint(self) -> dict:
        """What the store was fixed to at creation (``study_fingerprint``); empty before a sweep fixed it."""
        return json.loads(self.meta("fingerprint") or "{}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. An exception anywhere in it, Ctrl-C included (which may land between the
        BEGIN and the block), rolls back whatever is open, so the connection can start the next one."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # ------------------------------------------------------------------ runs and units

    def start_run(self, command: str, config: dict, provenance: dict) -> int:
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO runs (started, host, pid, command, config, provenance) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), socket.gethostname(), os.getpid(), command, json.dumps(config), json.dumps(provenance)),
            )
            run_id = cur.lastrowid
            assert run_id is not None  # an INSERT sets it
            return run_id

    def add_run_engine(self, run_id: int, choices: dict) -> None:
        """Keep an engine configuration a run used (choices, reasons, measurements, hardware) in its record."""
        with self.transaction():
            (provenance,) = self.db.execute("SELECT provenance FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            provenance = json.loads(provenance)
            provenance.setdefault("engines", []).append(choices)
            self.db.execute("UPDATE runs SET provenance = ? WHERE run_id = ?", (json.dumps(provenance), run_id))

    def done_units(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT unit_id FROM units")}

    def claim(self, unit_id: str) -> bool:
        """Claim a unit for this process unless a live process on this host holds it."""
        host, pid = socket.gethostname(), os.getpid()
        with self.transaction():
            if self.db.execute("SELECT 1 FROM units WHERE unit_id = ?", (unit_id,)).fetchone():
                return False
            row = self.db.execute("SELECT host, pid FROM claims WHERE unit_id = ?", (unit_id,)).fetchone()
            if row and (row[0], row[1]) != (host, pid) and row[0] == host and _alive(row[1]):
                return False
            self.db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)", (unit_id, host, pid, time.time()))
            return True

    def commit_unit(
        self,
        unit_id: str,
        run_id: int,
        spec: dict,
        seconds: float,
        predictions: list[dict],
        scores: list[tuple[str, int, str, float]],
        context_tokens: float,
        query_tokens: float,
        audit: Sequence[dict] = (),
        prompts: Sequence[dict] = (),
    ) -> bool:
        """Write a finished unit and all its rows (its audited rows, its items' prompts: ``item``, ``text``,
        ``token_offsets``) at once. False if someone committed it first."""
        with self.transaction():
            if self.db.execute("SELECT 1 FROM units WHERE unit_id = ?", (unit_id,)).fetchone():
                return False
            self.db.executemany(
                "INSERT INTO predictions VALUES (:unit_id, :item, :example_id, :variant, :layer, :prompt_token_ids, "
                ":hidden_ranges, :in_context_ids, :raw_generation, :generation, :reference, :finish, "
                ":sentence_score, :stats, :n_instructions, :n_examples, :n_query)",
                [dict(p, unit_id=unit_id) for p in predictions],
            )
            self.db.executemany(
                "INSERT INTO scores VALUES (?, ?, ?, ?, ?)",
                [(unit_id, v, layer, m, val) for v, layer, m, val in scores],
            )
            self.db.executemany(
                "INSERT INTO audits VALUES (:unit_id, :item, :variant, :layer, :agree, :position, :margin, :threshold, "
                ":fault, :seed)",
                [dict(a, unit_id=unit_id) for a in audit],
            )
            self.db.executemany(
                "INSERT INTO prompts VALUES (:unit_id, :item, :text, :token_offsets)",
                [dict(p, unit_id=unit_id) for p in prompts],
            )
            self.db.execute(
                "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                (unit_id, run_id, json.dumps(spec, sort_keys=True), time.time(), seconds, context_tokens, query_tokens),
            )
            self.db.execute("DELETE FROM claims WHERE unit_id = ?", (unit_id,))
            return True

    def release(self, unit_id: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM claims WHERE unit_id = ? AND pid = ?", (unit_id, os.getpid()))

    # ------------------------------------------------------------------ reading

    def units(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT unit_id, spec, seconds, context_tokens, query_tokens FROM units ORDER BY unit_id"
        )
        return [
            dict(unit_id=u, spec=json.loads(s), seconds=sec, context_tokens=c, query_tokens=q)
            for u, s, sec, c, q in rows
        ]

    def predictions(self, unit_id: str) -> list[dict]:
        return _dicts(
            self.db.execute("SELECT * FROM predictions WHERE unit_id = ? ORDER BY variant, layer, item", (unit_id,))
        )

    def predictions_at(self, variant: str, layer: int, spec: dict) -> list[dict]:
        """The prediction rows of ``variant`` at ``layer`` in every unit whose spec has ``spec``'s values (by unit,
        then item)."""
        units = [u["unit_id"] for u in self.units() if all(u["spec"].get(k) == v for k, v in spec.items())]
        cur = self.db.execute(
            f"SELECT * FROM predictions WHERE variant = ? AND layer = ? AND unit_id IN ({', '.join('?' * len(units))}) "
            "ORDER BY unit_id, item",
            (variant, layer, *units),
        )
        return _dicts(cur)

    def prompts(self, unit_id: str) -> dict[int, dict]:
        """The unit's prompts by item: ``text`` and ``token_offsets`` (the character range [start, end) of each
        prompt token, as stored with the prediction rows' token ids). Empty for units stored without them."""
        rows = self.db.execute("SELECT item, text, token_offsets FROM prompts WHERE unit_id = ?", (unit_id,))
        return {item: dict(text=text, token_offsets=json.loads(offsets)) for item, text, offsets in rows}

    def scores(self, unit_id: str) -> list[tuple[str, int, str, float]]:
        return list(
            self.db.execute(
                "SELECT variant, layer, metric, value FROM scores WHERE unit_id = ? ORDER BY variant, layer", (unit_id,)
            )
        )

    def primary_metric(self, unit_id: str) -> str:
        """The unit's own metric: the first score it stored (the task's metric; extras such as chrF follow)."""
        row = self.db.execute(
            "SELECT metric FROM scores WHERE unit_id = ? ORDER BY rowid LIMIT 1", (unit_id,)
        ).fetchone()
        if row is None:
            raise UserError(f"store {self.path}: unit {unit_id} has no scores")
        return row[0]

    def audits(self) -> list[dict]:
        """Every audited row (engine vs reference engine), with its unit's spec, in unit order."""
        cur = self.db.execute(
            "SELECT a.unit_id, u.spec, a.item, a.variant, a.layer, a.agree, a.position, a.margin, "
            "a.threshold, a.fault, a.seed FROM audits a JOIN units u USING (unit_id) "
            "ORDER BY u.finished, a.item, a.variant, a.layer"
        )
        names = (
            "unit_id",
            "spec",
            "item",
            "variant",
            "layer",
            "agree",
            "position",
            "margin",
            "threshold",
            "fault",
            "seed",
        )
        rows = [dict(zip(names, r)) for r in cur]
        for r in rows:
            r["spec"], r["agree"], r["fault"] = json.loads(r["spec"]), bool(r["agree"]), bool(r["fault"])
        return rows

    def runs(self) -> list[dict]:
        cur = self.db.execute("SELECT run_id, started, host, command, config, provenance FROM runs ORDER BY run_id")
        return [
            dict(run_id=r, started=s, host=h, command=c, config=json.loads(cf), provenance=json.loads(p))
            for r, s, h, c, cf, p in cur
        ]

    def add_pruning(self, run_id: int, task: str, pair: str, data: dict) -> None:
        """One context-pruning measurement (pruning.measure_pruning); every measurement is kept."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO pruning VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    run_id,
                    task,
                    pair,
                    data["condition"],
                    data["from_layer"],
                    json.dumps(data, default=float),
                ),
            )

    def pruning_results(self) -> list[dict]:
        rows = self.db.execute("SELECT task, pair, data FROM pruning ORDER BY measured")
        return [dict(json.loads(d), task=t, pair=p) for t, p, d in rows]

    def has_lora(self, unit_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM lora WHERE unit_id = ?", (unit_id,)).fetchone() is not None

    def add_lora(self, unit_id: str, layer: int, bleu: float, curve: dict, adapter_path: str) -> None:
        """One single-layer LoRA result (its settings inside ``curve``); a rerun of the same unit replaces it."""
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO lora VALUES (?, ?, ?, ?, ?, ?)",
                (unit_id, layer, "bleu", bleu, json.dumps(curve), adapter_path),
            )

    def lora_results(self) -> list[dict]:
        """Every LoRA result: layer, bleu, pair, n_test, the training curve and settings."""
        rows = self.db.execute(
            "SELECT unit_id, layer, value, curve, adapter_path FROM lora WHERE metric = 'bleu' ORDER BY layer"
        )
        return [dict(json.loads(c), unit_id=u, layer=layer, bleu=v, adapter=a) for u, layer, v, c, a in rows]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dicts(cursor: sqlite3.Cursor) -> list[dict]:
    """A query's rows, each as {column: value}."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
