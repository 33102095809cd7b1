"""Sweeps, the results store (resume after kill -9, concurrency), analysis and the report."""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from icl_locate.cli import main
from icl_locate.results.analysis import Curve, analyse_curve, recognition_layer, savings
from icl_locate.results.store import Store
from icl_locate.tasks.metrics import PassAt1

BASE = [
    "sweep",
    "--model",
    "tiny:llama",
    "--pairs",
    "fra-eng,eng-fra",
    "--conditions",
    "instructions+examples,examples",
    "--seeds",
    "0,1,2",
    "--ks",
    "1",
    "--n-test",
    "2",
    "--max-new-tokens",
    "6",
    "--layers",
    "0,2,4",
]
N_UNITS = 2 * 2 * 3


def sweep_cmd(store, data_dir, extra=()):
    return [sys.executable, "-m", "icl_locate.cli", *BASE, "--store", str(store), "--data-dir", str(data_dir), *extra]


def rows(store) -> list[tuple]:
    db = sqlite3.connect(store)
    out = db.execute(
        "SELECT unit_id, item, example_id, variant, layer, prompt_token_ids, hidden_ranges, "
        "generation, reference, sentence_score FROM predictions ORDER BY 1, 2, 4, 5"
    ).fetchall()
    db.close()
    return out


def n_units(store) -> int:
    try:
        db = sqlite3.connect(store)
        n = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        db.close()
        return n
    except sqlite3.OperationalError:
        return 0


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, data_dir):
    store = tmp_path_factory.mktemp("ref") / "ref.sqlite"
    subprocess.run(sweep_cmd(store, data_dir), check=True, capture_output=True)
    return store


def test_uninterrupted_run_is_complete(reference_store):
    assert n_units(reference_store) == N_UNITS
    assert len(rows(reference_store)) == N_UNITS * 2 * 3  # items x layers


def test_resume_after_kill_9_equals_uninterrupted(tmp_path, data_dir, reference_store):
    store = tmp_path / "s.sqlite"
    proc = subprocess.Popen(sweep_cmd(store, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while n_units(store) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = n_units(store)
    assert 0 < killed_at < N_UNITS, "the sweep must be killed mid-way for this test to mean anything"
    subprocess.run(sweep_cmd(store, data_dir), check=True, capture_output=True)
    assert rows(store) == rows(reference_store)


def test_rerun_is_a_no_op(tmp_path, data_dir, reference_store, capsys):
    before = rows(reference_store)
    assert main([*BASE, "--store", str(reference_store), "--data-dir", str(data_dir)]) == 0
    assert "0 units run" in capsys.readouterr().out
    assert rows(reference_store) == before


def test_two_concurrent_sweeps(tmp_path, data_dir, reference_store):
    store = tmp_path / "c.sqlite"
    procs = [
        subprocess.Popen(sweep_cmd(store, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert rows(store) == rows(reference_store)


def open_store(path, barrier, results) -> None:
    """Open (create) the store at ``path`` once every opener is ready; put "ok" or the error."""
    barrier.wait()
    try:
        Store(path).close()
        results.put("ok")
    except Exception as err:  # reported to the test, not raised in the child
        results.put(repr(err))


def test_processes_creating_one_store_at_once_all_open_it(tmp_path):
    """Eight processes create the same new store at the same moment, 20 times: every one opens it (a schema
    read upgraded to a write, or the switch to WAL, used to meet the other's lock: "database is locked")."""
    context = multiprocessing.get_context("fork")
    for trial in range(20):
        barrier, results = context.Barrier(8), context.Queue()
        path = tmp_path / f"s{trial}.sqlite"
        procs = [context.Process(target=open_store, args=(path, barrier, results)) for _ in range(8)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        assert [results.get(timeout=10) for _ in procs] == ["ok"] * 8, trial


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--conditions", "bogus"], "unknown condition"),
        (["--pairs", "fra-xyz"], "unknown language code"),
        (["--ks", "500"], "prompt bank has 197"),
        (["--ks", "20"], "exceeds the model's context"),
    ],
)
def test_bad_input_leaves_store_unchanged(tmp_path, data_dir, reference_store, capsys, extra, message):
    before = digest(reference_store)
    code = main([*BASE, "--store", str(reference_store), "--data-dir", str(data_dir), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert digest(reference_store) == before


def test_store_of_another_model_is_refused(data_dir, reference_store, capsys):
    before = digest(reference_store)
    code = main([*BASE, "--store", str(reference_store), "--data-dir", str(data_dir), "--model", "tiny:qwen2"])
    err = capsys.readouterr().err
    assert code == 2 and "was written with other settings" in err and "tiny:qwen2" in err
    assert digest(reference_store) == before


def test_unwritable_store_path(tmp_path, data_dir, capsys):
    code = main([*BASE, "--store", str(tmp_path / "missing" / "s.sqlite"), "--data-dir", str(data_dir)])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_ctrl_c_between_begin_and_block_leaves_no_open_transaction(tmp_path):
    """Ctrl-C can land right after a transaction's BEGIN (a sweep interrupted while claiming a unit): the
    transaction is rolled back, and releasing the claims afterwards (what the sweep's cleanup does) works."""

    class InterruptedAfterBegin:  # the connection, with Ctrl-C arriving as its BEGIN returns (once)
        def __init__(self, db: sqlite3.Connection):
            self.db, self.armed = db, True

        def execute(self, sql, *args):
            result = self.db.execute(sql, *args)
            if sql == "BEGIN IMMEDIATE" and self.armed:
                self.armed = False
                raise KeyboardInterrupt
            return result

        def __getattr__(self, name):
            return getattr(self.db, name)

    with Store(tmp_path / "s.sqlite", {"model": "x"}) as store:
        real = store.db
        store.db = InterruptedAfterBegin(real)  # pyright: ignore[reportAttributeAccessIssue]
        with pytest.raises(KeyboardInterrupt):
            store.claim("unit-1")
        store.db = real
        assert not real.in_transaction
        store.release("unit-1")  # the sweep's cleanup after Ctrl-C
        assert store.claim("unit-1")


def test_report_from_store(tmp_path, reference_store, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(reference_store), "--out-dir", str(out), "--bootstrap", "50"]) == 0
    import base64

    import matplotlib.image as mpimg

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2  # one figure per (pair, k)
    page = (out / "report.html").read_text()
    for png in pngs:
        assert mpimg.imread(png).shape[0] > 100
        assert base64.b64encode(png.read_bytes()).decode() in page and png.name in page
    assert main(["report", str(reference_store), "--out-dir", str(out), "--format", "md", "--bootstrap", "20"]) == 0
    md = (out / "report.md").read_text()
    assert "| task |" in md and all(f"]({p.name})" in md for p in pngs)


def test_report_of_missing_store(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- analysis on synthetic data


@pytest.mark.parametrize(
    "scores,expected",
    [
        ([0, 1, 2, 30, 31, 30, 30], 3),  # clear plateau
        ([0, 1, 2, 3, 4, 5, 30], 6),  # no plateau before L
        ([0, 2, 29, 27, 30, 28.6, 30], 4),  # noisy: 27 < 0.95 * 30 breaks the first plateau
        ([31, 30, 30, 29, 30, 30, 30], 0),  # never hurts
    ],
)
def test_recognition_layer_synthetic(scores, expected):
    assert recognition_layer(list(range(len(scores))), scores, scores[-1], 0.95) == expected


def _bernoulli_curve(rng, p_by_layer, items=60, seeds=1):
    stats = np.stack([np.stack([(rng.random((items, 1)) < p).astype(float) for p in p_by_layer]) for _ in range(seeds)])
    return Curve(
        key=dict(
            task="t", pair="", kind="mask", condition="instructions+examples", instructions=True, k=5, n_test=items
        ),
        layers=list(range(len(p_by_layer))),
        metric=PassAt1(),
        seeds=list(range(seeds)),
        item_stats=stats,
        context_tokens=300.0,
        query_tokens=60.0,
    )


def test_bootstrap_ci_coverage():
    rng = np.random.default_rng(0)
    p = 0.4
    hits = 0
    trials = 120
    for t in range(trials):
        curve = analyse_curve(_bernoulli_curve(rng, [p, p]), n_boot=200, seed=t)
        lo, hi = curve.ci[0]
        hits += lo <= 100 * p <= hi
    assert 0.85 <= hits / trials <= 0.99


def test_recognition_ci_and_savings():
    rng = np.random.default_rng(1)
    curve = analyse_curve(_bernoulli_curve(rng, [0.0, 0.0, 0.05, 0.9, 0.9, 0.9, 0.9], items=80, seeds=3), n_boot=200)
    assert curve.recognition == 3 and curve.recognition_ci[0] <= 3 <= curve.recognition_ci[1]
    s = savings(curve, 6)
    assert s.paper_formula == pytest.approx((6 - 3) / 6 * 5 / 6)
    assert s.token_exact == pytest.approx((6 - 3) / 6 * 300 / 360)


def test_no_savings_for_masks_that_hide_the_query():
    rng = np.random.default_rng(2)
    curve = _bernoulli_curve(rng, [0.0, 0.9, 0.9])
    curve.key["condition"] = "query"
    assert savings(analyse_curve(curve, n_boot=20), 2) is None
