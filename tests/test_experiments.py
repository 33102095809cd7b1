"""The experiments layer's seams: settings checked before any model loads, the driver as the one
writer of the store, executors that only compute, metric objects, the progress facility."""

from __future__ import annotations

import io
import sqlite3

import numpy as np
import pytest

from conftest import tiny_worker
from icl_locate.cli import main
from icl_locate.experiments import bench, decode, prune, sweep, units
from icl_locate.experiments.executors import LocalExecutor
from icl_locate.experiments.planning import plan_units
from icl_locate.experiments.settings import SweepConfig
from icl_locate.results.store import Store
from icl_locate.tasks.metrics import Bleu, PassAt1, translation_scores
from icl_locate.util.progress import Progress


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the settings must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in (sweep, bench, prune, decode):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sweep", "--store", "S", "--preset", "nope"], "unknown preset"),
        (["sweep", "--store", "S", "--conditions", "bogus"], "unknown condition"),
        (["sweep", "--store", "S", "--layers", "1,x"], "--layers must be"),
        (["sweep", "--store", "S", "--pairs", "fra-xyz"], "unknown language code"),
        (["sweep", "--store", "S", "--n-test", "0"], "--n-test must be >= 1"),
        (["sweep", "--store", "S", "--dtype", "fp7"], "unknown dtype"),
        (["sweep", "--store", "S", "--ks", "500"], "prompt bank has 197"),
        (["sweep", "--store", "S", "--dry-run", "--task", "nope"], "unknown task"),
        (["bench", "--condition", "bogus"], "unknown condition"),
        (["prune", "--layer", "2", "--condition", "bogus"], "unknown condition"),
        (["run", "--condition", "bogus", "--pair", "fra-eng"], "unknown condition"),
    ],
)
def test_settings_fail_before_any_model_loads(argv, message, no_model_loads, capsys, tmp_path, data_dir):
    argv = [str(tmp_path / "s.sqlite") if a == "S" else a for a in argv]
    assert main([*argv, "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s.sqlite").exists()


class FailingSecond:
    """An executor that computes the first unit, then fails as a crashed worker would."""

    def __init__(self, worker):
        self.worker = worker

    def map(self, units, progress):
        for n, unit in enumerate(units):
            if n == 1:
                raise RuntimeError("worker died")
            yield self.worker.compute(unit)


def test_driver_commits_what_comes_back_and_releases_the_rest(tmp_path, data_dir):
    config = SweepConfig(
        model="tiny:llama",
        pairs=["fra-eng"],
        conditions=["examples", "instructions+examples"],
        seeds=[0],
        ks=[1],
        layers="0,4",
        n_test=2,
        max_new_tokens=3,
        data_dir=str(data_dir),
    )
    worker = tiny_worker(config, fast_engine=True, max_new_tokens=config.max_new_tokens)
    units = plan_units(config, worker.loaded.info.num_layers)
    path = tmp_path / "s.sqlite"
    with Store(path, {"model": "tiny:llama"}) as store:
        run_id = store.start_run("test", {}, {})
        with pytest.raises(RuntimeError, match="worker died"):
            sweep.execute(FailingSecond(worker), store, units, run_id)
        assert store.done_units() == {units[0].unit_id}
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # the unfinished claim was released
    db.close()
    with Store(path, {"model": "tiny:llama"}) as store:  # a rerun computes only what is missing
        ran, skipped = sweep.execute(LocalExecutor(worker), store, units, run_id)
        assert (ran, skipped) == (1, 1) and store.done_units() == {u.unit_id for u in units}


def small_sweep(data_dir, model: str, layers: str, n_test: int, max_new_tokens: int) -> SweepConfig:
    """One fra->eng unit of a tiny model: instructions+examples, k=1, seed 0."""
    return SweepConfig(
        model=model,
        pairs=["fra-eng"],
        conditions=["instructions+examples"],
        seeds=[0],
        ks=[1],
        layers=layers,
        n_test=n_test,
        max_new_tokens=max_new_tokens,
        data_dir=str(data_dir),
    )


def test_computing_a_unit_writes_nothing_and_is_repeatable(tmp_path, data_dir):
    config = small_sweep(data_dir, "tiny:qwen2", "0,2,4", n_test=2, max_new_tokens=3)
    worker = tiny_worker(config, fast_engine=True, max_new_tokens=config.max_new_tokens)
    unit = plan_units(config, worker.loaded.info.num_layers)[0]
    first, second = worker.compute(unit), worker.compute(unit)
    assert first.predictions == second.predictions and first.scores == second.scores
    assert len(first.predictions) == 2 * 3 and {p["layer"] for p in first.predictions} == {0, 2, 4}
    assert list(tmp_path.iterdir()) == []


def test_a_worker_hands_back_the_memory_of_each_unit_it_computed(data_dir, monkeypatch):
    config = small_sweep(data_dir, "tiny:llama", "0,4", n_test=1, max_new_tokens=2)
    worker = tiny_worker(config, fast_engine=True, max_new_tokens=config.max_new_tokens)
    unit = plan_units(config, worker.loaded.info.num_layers)[0]
    handed_back = []
    monkeypatch.setattr(units, "return_free_memory", lambda: handed_back.append(unit.unit_id))
    worker.compute(unit)
    assert handed_back == [unit.unit_id]
    monkeypatch.setattr(worker, "compute_rows", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.compute(unit)
    assert len(handed_back) == 2  # a unit that failed freed its memory too
    monkeypatch.setattr(units, "return_free_memory", lambda: 1 / [])  # e.g. a GPU left in an error state
    with pytest.raises(ZeroDivisionError):  # the unit's own error, not the freeing's TypeError
        worker.compute(unit)


def test_bleu_metric_statistics_aggregate_to_the_corpus_score():
    hyps = ["the cat sat on the mat.", "a dog ran", "completely different words here", ""]
    refs = ["the cat sat on the mat.", "the dog ran away", "something else entirely", "empty"]
    examples = [type("E", (), {"target": r, "id": str(i)})() for i, r in enumerate(refs)]
    scored = Bleu().score(hyps, examples, None)
    assert scored.corpus["bleu"] == pytest.approx(translation_scores(hyps, refs).bleu)
    assert Bleu().aggregate(np.array(scored.stats)) == pytest.approx(scored.corpus["bleu"])
    subset = np.array(scored.stats)[[0, 1]]
    assert Bleu().aggregate(subset) == pytest.approx(translation_scores(hyps[:2], refs[:2]).bleu)


def test_pass_at_1_aggregate():
    assert PassAt1().aggregate(np.array([[1.0], [0.0], [1.0], [1.0]])) == 75.0


def test_progress_without_a_terminal_prints_one_line_per_step():
    out = io.StringIO()
    with Progress(3, "sweep", stream=out) as progress:
        assert progress.inner("unit") is None  # no per-row chatter in logs
        progress.advance("unit a")
        progress.advance("unit b")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("sweep [1/3] unit a") and "left" in lines[1]
