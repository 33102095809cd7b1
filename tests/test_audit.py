"""The built-in audit: sampled rows decoded again by the reference engine, agreement and the reference's
margin at the first difference stored per row, faults told from near-ties, --audit-strict."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest
import torch

from conftest import tiny, tiny_worker
from icl_locate.cli import main
from icl_locate.core.conditions import get_condition
from icl_locate.core.interventions import MaskFrom
from icl_locate.engines import audit as audit_module
from icl_locate.engines.audit import audit_rows, margin_threshold, reference_margin, sample_rows
from icl_locate.engines.base import StopRule
from icl_locate.engines.tree import TreeEngine
from icl_locate.experiments import units
from test_fast_engine import encoded_prompts, masked

STOP = StopRule((), 6)


def setup(family="llama"):
    lm = tiny(family)
    prompts = masked(encoded_prompts(lm.tokenizer), get_condition("instructions+examples"))
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    gens = TreeEngine(lm.model, lm.tokenizer).generate(prompts, rows, STOP)
    return lm, prompts, rows, gens


def test_rows_are_drawn_with_the_seed():
    rows = [MaskFrom(j) for j in range(5)]
    first = sample_rows(3, rows, 4, "0:abc")
    assert first == sample_rows(3, rows, 4, "0:abc") and len(set(first)) == 4
    assert first != sample_rows(3, rows, 4, "1:abc")
    assert sample_rows(2, rows[:2], 10, "x") == [(0, 0), (0, 1), (1, 0), (1, 1)]  # fewer rows than asked: all


def test_a_correct_engine_agrees_everywhere():
    lm, prompts, rows, gens = setup()
    checked = audit_rows(lm.model, lm.tokenizer, prompts, rows, gens, STOP, sample_rows(len(prompts), rows, 8, 0))
    assert len(checked) == 8
    assert all(r.agree and r.position is None and r.margin is None and not r.fault for r in checked)


def corrupt(gens, key, at: int, vocab: int):
    g = gens[key]
    tokens = list(g.token_ids)
    tokens[at] = (tokens[at] + 1) % vocab
    return {**gens, key: replace(g, token_ids=tokens)}


def test_a_wrong_token_is_found_with_the_reference_margin_there():
    lm, prompts, rows, gens = setup()
    key = (1, rows[2])
    assert len(gens[key].token_ids) >= 3
    wrong = corrupt(gens, key, 2, lm.model.config.vocab_size)
    (checked,) = audit_rows(lm.model, lm.tokenizer, prompts, rows, wrong, STOP, [(1, 2)])
    assert not checked.agree and checked.position == 2
    expected = reference_margin(lm.model, prompts[1], rows[2], gens[key].token_ids[:2])
    assert checked.margin == pytest.approx(expected) and checked.margin >= 0
    assert checked.threshold == margin_threshold(torch.float32)
    assert checked.fault == (checked.margin > checked.threshold)


def test_a_disagreement_below_the_threshold_is_a_near_tie(monkeypatch):
    lm, prompts, rows, gens = setup()
    key = (0, rows[1])
    wrong = corrupt(gens, key, 0, lm.model.config.vocab_size)
    monkeypatch.setitem(audit_module.MARGIN_THRESHOLDS, torch.float32, 1e9)
    (checked,) = audit_rows(lm.model, lm.tokenizer, prompts, rows, wrong, STOP, [(0, 1)])
    assert not checked.agree and not checked.fault
    monkeypatch.setitem(audit_module.MARGIN_THRESHOLDS, torch.float32, -1.0)
    (checked,) = audit_rows(lm.model, lm.tokenizer, prompts, rows, wrong, STOP, [(0, 1)])
    assert checked.fault


def test_margin_thresholds_grow_with_the_unit_roundoff():
    assert margin_threshold(torch.float32) < margin_threshold(torch.float16) < margin_threshold(torch.bfloat16)


SWEEP = [
    "sweep",
    "--model",
    "tiny:llama",
    "--pairs",
    "fra-eng",
    "--ks",
    "1",
    "--n-test",
    "2",
    "--max-new-tokens",
    "4",
    "--layers",
    "0,2,4",
    "--engine",
    "tree",
    "--head",
    "plain",
    "--draft-tokens",
    "0",
]


def test_a_sweep_stores_and_reports_its_audit(tmp_path, data_dir, capsys):
    store = tmp_path / "s.sqlite"
    assert main(SWEEP + ["--store", str(store), "--data-dir", str(data_dir), "--audit", "3"]) == 0
    out = capsys.readouterr()
    assert "audit 3/3 rows agree with the reference engine" in out.err
    assert "audit: 3/3 sampled rows agree" in out.out
    db = sqlite3.connect(store)
    rows = db.execute(
        "SELECT item, variant, layer, agree, position, margin, threshold, fault, seed FROM audits"
    ).fetchall()
    assert len(rows) == 3 and all(r[3] == 1 and r[4] is None and r[7] == 0 for r in rows)
    assert all(r[8].startswith("0:") for r in rows)
    assert main(["report", str(store), "--format", "md"]) == 0
    report = (tmp_path / "s_report" / "report.md").read_text()
    assert "## Audit: engine vs reference engine" in report and "| 3/3 | none |" in report


class Corrupting:
    """An engine whose first generated token is wrong in every row."""

    def __init__(self, engine, vocab):
        self.engine, self.vocab = engine, vocab

    def generate(self, prompts, interventions, stop, progress=None):
        out = self.engine.generate(prompts, interventions, stop, progress)
        return {
            k: replace(g, token_ids=[(g.token_ids[0] + 1) % self.vocab] + g.token_ids[1:]) if g.token_ids else g
            for k, g in out.items()
        }


def test_audit_strict_fails_on_an_engine_fault(tmp_path, data_dir, capsys, monkeypatch):
    real = units.build_engine
    monkeypatch.setattr(
        units,
        "build_engine",
        lambda model, tok, choices, calibrator=None: Corrupting(
            real(model, tok, choices, calibrator), model.config.vocab_size
        ),
    )
    store = tmp_path / "s.sqlite"
    code = main(SWEEP + ["--store", str(store), "--data-dir", str(data_dir), "--audit", "4", "--audit-strict"])
    out = capsys.readouterr()
    assert code == 1 and "disagree with the reference engine beyond a near-tie" in out.err
    assert "ENGINE FAULT" in out.out
    db = sqlite3.connect(store)
    faults = db.execute("SELECT position, margin, threshold FROM audits WHERE fault = 1").fetchall()
    assert faults and all(p == 0 and m > t for p, m, t in faults)
    assert db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 1  # the results are kept all the same
    assert json.loads(db.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()[0])


def test_auto_audits_within_its_share_of_the_decoding_time(tmp_path, data_dir):
    """--audit auto: the first unit audits one row; later rows only while the audit's time (at its
    measured cost per row) stays within AUDIT_SHARE of the decoding time."""
    from icl_locate.experiments.settings import SweepConfig, load_task_data
    from icl_locate.experiments.units import AUDIT_SHARE

    config = SweepConfig(
        model="tiny:llama",
        pairs=["fra-eng"],
        ks=[1],
        n_test=2,
        max_new_tokens=4,
        layers="0,2,4",
        data_dir=str(data_dir),
    )
    from icl_locate.experiments.planning import plan_units

    worker = tiny_worker(config, audit=None)
    (unit,) = plan_units(config, worker.loaded.info.num_layers, load_task_data(config))
    worker.seconds.update(decoding=0.0, audit=0.0, audit_rows=0)
    first = worker.compute(unit)
    assert len(first.audit) >= 1
    # pretend audited rows cost far more than decoding: no further row fits the budget
    worker.seconds["audit"] = 1e6
    assert worker.compute(unit).audit == []
    # and far less: every row of the unit fits
    worker.seconds.update(audit=1e-9, decoding=1e6)
    assert len(worker.compute(unit).audit) == 2 * 3  # items x layers
    assert AUDIT_SHARE == 0.05
