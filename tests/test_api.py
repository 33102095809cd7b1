"""The Python API (``icl_locate.api``): the README's example runs as written; the DataFrames have the
documented columns and agree with the store's own analysis; the API and the command line write the same
store; every engine gives the reference engine's tokens; ``import icl_locate`` imports no torch."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import icl_locate
from conftest import REPO, tiny
from icl_locate import api
from icl_locate.cli import main
from icl_locate.experiments.lora import lora_settings
from icl_locate.results import analysis
from icl_locate.results.store import Store

CELL = ["task", "pair", "kind", "condition", "instructions", "k", "n_test", "data", "labels"]
SETTINGS = dict(
    model="tiny:llama",
    pairs=["fra-eng"],
    conditions=["instructions+examples", "examples"],
    seeds=[0, 1],
    ks=[1],
    n_test=2,
    max_new_tokens=6,
    layers="0,2,4",
)
CLI_SETTINGS = [
    *("--model", "tiny:llama", "--pairs", "fra-eng", "--conditions", "instructions+examples,examples"),
    *("--seeds", "0,1", "--ks", "1", "--n-test", "2", "--max-new-tokens", "6", "--layers", "0,2,4"),
]
N_BOOT = 50


def readme_example() -> str:
    """The fenced python block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, data_dir):
    import matplotlib.pyplot as plt

    monkeypatch.setenv("ICL_LOCATE_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "study.sqlite").is_file() and (tmp_path / "curve.png").is_file()
    plt.close("all")


@pytest.fixture(scope="module")
def study_store(tmp_path_factory, data_dir):
    """A store with every kind of result: layer sweeps (two conditions, two seeds), a head knockout
    sweep, a context-pruning measurement and a single-layer LoRA result, all on ``tiny:llama``."""
    out = tmp_path_factory.mktemp("study")
    store = out / "study.sqlite"
    api.sweep({**SETTINGS, "data_dir": str(data_dir)}, store)
    knockout = dict(SETTINGS, conditions=["instructions+examples"], seeds=[0], heads="knockout", layers="1,2")
    api.sweep({**knockout, "data_dir": str(data_dir)}, store)
    common = ["--model", "tiny:llama", "--n-test", "2", "--data-dir", str(data_dir), "--store", str(store)]
    assert main(["prune", *common, "--k", "1", "--max-new-tokens", "6", "--layer", "2"]) == 0
    lora = ["--layers", "1", "--train-size", "8", "--val-size", "4", "--epochs", "1", "--micro-batch", "4"]
    assert main(["lora-sweep", *common, *lora, "--out-dir", str(out / "lora")]) == 0
    return store


def test_curves_and_recognition_agree_with_the_analysis(study_store):
    study = api.open_store(study_store)
    curves = study.curves(n_boot=N_BOOT)
    recognition = study.recognition(n_boot=N_BOOT)
    with Store(study_store, create=False) as store:
        expected = [analysis.analyse_curve(c, n_boot=N_BOOT) for c in analysis.load_curves(store)]
    assert list(curves.columns) == [*CELL, "metric", "layer", "score", "ci_low", "ci_high"]
    assert len(expected) == 2 and len(curves) == sum(len(c.layers) for c in expected)
    for c in expected:
        rows = curves[(curves.condition == c.key["condition"]) & (curves.kind == c.key["kind"])]
        assert rows.layer.tolist() == c.layers == [0, 2, 4]
        assert rows.score.tolist() == pytest.approx(c.score)
        assert rows.ci_low.tolist() == pytest.approx([lo for lo, _ in c.ci])
        assert rows.ci_high.tolist() == pytest.approx([hi for _, hi in c.ci])
        assert set(rows.metric) == {"bleu"} and set(rows.k) == {1} and set(rows.pair) == {"fra-eng"}

    assert list(recognition.columns) == [
        *CELL,
        "metric",
        "baseline",
        "recognition_layer",
        "ci_low",
        "ci_high",
        "verdict",
    ]
    assert recognition.recognition_layer.dtype == "Int64"
    assert len(recognition) == len(expected)
    for c, (_, row) in zip(expected, recognition.iterrows()):
        assert row.condition == c.key["condition"] and row.verdict == c.verdict
        assert row.baseline == pytest.approx(c.baseline)
        assert (None if pd.isna(row.recognition_layer) else int(row.recognition_layer)) == c.recognition
        if c.recognition_ci is not None:
            assert (row.ci_low, row.ci_high) == pytest.approx(c.recognition_ci)


def test_head_maps_agree_with_the_analysis(study_store):
    heads = api.open_store(study_store).head_maps(n_boot=N_BOOT)
    with Store(study_store, create=False) as store:
        (m,) = [analysis.analyse_head_map(m, n_boot=N_BOOT) for m in analysis.load_head_maps(store)]
    assert list(heads.columns) == [
        *CELL,
        *("from_layer", "metric", "reference_score", "layer", "head", "delta", "ci_low", "ci_high"),
    ]
    assert m.layers == [1, 2] and m.heads == [0, 1, 2, 3]
    assert list(zip(heads["layer"], heads["head"])) == [(layer, h) for layer in m.layers for h in m.heads]
    assert heads.delta.to_numpy().reshape(2, 4) == pytest.approx(m.delta)
    assert heads.ci_low.to_numpy().reshape(2, 4) == pytest.approx(m.ci[..., 0])
    assert set(heads.kind) == {"knockout"} and heads.reference_score.tolist() == pytest.approx([m.reference_score] * 8)


def test_predictions_lora_and_pruning_tables(study_store):
    study = api.open_store(study_store)
    predictions = study.predictions()
    assert list(predictions.columns) == [
        *CELL,
        *("from_layer", "seed", "unit_id", "item", "example_id", "variant", "layer", "generation"),
        *("raw_generation", "reference", "sentence_score", "finish"),
    ]
    db = sqlite3.connect(study_store)
    assert len(predictions) == db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    db.close()
    assert set(predictions.variant) == {"mask"} | {f"knockout/h{h}" for h in range(4)}

    lora = study.lora()
    with Store(study_store, create=False) as store:
        (stored_lora,) = store.lora_results()
        (stored_pruning,) = store.pruning_results()
    assert list(lora.columns) == [
        *("pair", "layer", "bleu", "n_test", "best_val_loss", "epochs", "train_loss", "val_loss"),
        *("train_tokens", "sequence_tokens", "train_seconds", "seconds", "loss", "settings", "adapter", "unit_id"),
    ]
    assert (lora.pair[0], lora.layer[0], lora.epochs[0], lora.loss[0]) == ("fra-eng", 1, 1, "answer")
    assert lora.bleu[0] == pytest.approx(stored_lora["bleu"])

    pruning = study.pruning()
    documented = [
        *("task", "pair", "model", "condition", "from_layer", "num_layers", "k", "sentences", "metric"),
        *("full_score", "pruned_score", "quality_kept", "flops_saved_prompt", "flops_saved_total"),
        *("time_saved_prefill", "time_saved_total", "kv_saved", "paper_estimate", "identical_to_masked"),
    ]
    assert list(pruning.columns[: len(documented)]) == documented
    assert {"full_seconds", "pruned_kv_mb_peak", "pruned_gflop_prompt"} <= set(pruning.columns)
    assert not {"full_generations", "full_token_ids", "hardware"} & set(pruning.columns)
    assert (pruning.from_layer[0], pruning.num_layers[0], pruning.identical_to_masked[0]) == (2, 4, 2)
    assert pruning.pruned_score[0] == pytest.approx(stored_pruning["pruned"]["score"])


def test_figures_are_matplotlib_figures_and_the_report_still_draws_them(study_store, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    study = api.open_store(study_store)
    curve = study.curve_figure(pair="fra-eng")
    heads = study.head_figure(kind="knockout")
    lora = study.lora_figure()
    assert all(isinstance(f, Figure) for f in (curve, heads, lora))
    assert [t.get_text() for t in heads.axes[0].get_yticklabels()] == ["1", "2"]
    with pytest.raises(api.UserError, match="0 curves match"):
        study.curve_figure(pair="eng-fra")
    plt.close("all")
    assert main(["report", str(study_store), "--out-dir", str(tmp_path), "--bootstrap", "20"]) == 0
    assert len(list(tmp_path.glob("mask_*.png"))) == 1 and len(list(tmp_path.glob("heads_*.png"))) == 1
    assert (tmp_path / "lora_fra-eng.png").is_file()


def store_contents(path) -> dict:
    """What a sweep computed, without run ids and times: units, predictions, scores, fingerprint, config."""
    db = sqlite3.connect(path)
    queries = dict(
        units="SELECT unit_id, spec, context_tokens, query_tokens FROM units ORDER BY unit_id",
        predictions="SELECT * FROM predictions ORDER BY unit_id, item, variant, layer",
        scores="SELECT * FROM scores ORDER BY unit_id, variant, layer, metric",
        meta="SELECT * FROM meta ORDER BY key",
    )
    out = {name: db.execute(query).fetchall() for name, query in queries.items()}
    out["configs"] = [json.loads(c) for (c,) in db.execute("SELECT config FROM runs ORDER BY run_id")]
    db.close()
    return out


def test_the_api_and_the_command_line_write_the_same_store(tmp_path, data_dir):
    from_cli, from_api = tmp_path / "cli.sqlite", tmp_path / "api.sqlite"
    assert main(["sweep", *CLI_SETTINGS, "--data-dir", str(data_dir), "--store", str(from_cli)]) == 0
    result = api.sweep(api.SweepConfig(**SETTINGS, data_dir=str(data_dir)), from_api)
    assert (result.planned, result.ran, result.skipped) == (4, 4, 0)
    cli, from_python = store_contents(from_cli), store_contents(from_api)
    assert len(cli["predictions"]) == 4 * 2 * 3  # units x items x layers
    assert cli == from_python


def test_run_and_report_give_what_their_commands_give(tmp_path, data_dir, study_store):
    run = dict(model="tiny:llama", pair="fra-eng", condition="instructions+examples", from_layer=2, k=1, n_test=2)
    argv = ["run", "--model", "tiny:llama", "--pair", "fra-eng", "--condition", "instructions+examples"]
    argv += ["--from-layer", "2", "--k", "1", "--n-test", "2", "--data-dir", str(data_dir)]
    assert main([*argv, "--out", str(tmp_path / "cli.jsonl")]) == 0
    result = api.run({**run, "data_dir": str(data_dir), "out": str(tmp_path / "api.jsonl")})
    from_cli = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    assert len(from_cli) == 2 and result.rows == from_cli
    assert [json.loads(line) for line in (tmp_path / "api.jsonl").read_text().splitlines()] == from_cli
    assert main(["report", str(study_store), "--out-dir", str(tmp_path / "cli"), "--bootstrap", "20"]) == 0
    path = api.report(study_store, tmp_path / "api", bootstrap=20)
    assert path == tmp_path / "api" / "report.html"
    assert sorted(f.name for f in path.parent.iterdir()) == sorted(f.name for f in (tmp_path / "cli").iterdir())


@pytest.mark.parametrize("engine", ["auto", "fast", "tree"])
def test_every_engine_gives_the_reference_engines_tokens(engine, data_dir):
    lm = tiny("llama")
    n_layers = lm.info.num_layers
    items = api.prompts(lm, "flores", pair="fra-eng", k=2, n_test=3, data_dir=data_dir)
    rows = [api.MaskFrom(j) for j in range(n_layers + 1)]
    rows += [api.HeadMask(frozenset({(1, 0), (2, 3)})), api.AblateLayers(frozenset({1})), api.UNCHANGED]
    reference = api.generate(lm, items, rows, max_new_tokens=8)
    assert [(o.item, o.intervention) for o in reference] == [(i, row) for i in range(3) for row in rows]
    other = api.generate(lm, items, rows, max_new_tokens=8, engine=engine)
    assert [(o.item, o.intervention, o.token_ids, o.text, o.finish) for o in other] == [
        (o.item, o.intervention, o.token_ids, o.text, o.finish) for o in reference
    ]
    by_row = {(o.item, o.intervention): o.token_ids for o in reference}
    assert all(by_row[(i, api.MaskFrom(n_layers))] == by_row[(i, api.UNCHANGED)] for i in range(3))


def test_prompts_and_generate_reproduce_what_a_sweep_stores(study_store, data_dir):
    lm = tiny("llama")
    items = api.prompts(lm, "flores", pair="fra-eng", k=1, seed=1, n_test=2, data_dir=data_dir)
    item = items[0]
    (hidden,) = item.hidden_text  # instructions and examples, one range: the query stays visible
    assert item.text.startswith(hidden) and item.source in item.text[len(hidden) :]
    outputs = api.generate(lm, items, [api.MaskFrom(2)], max_new_tokens=SETTINGS["max_new_tokens"])
    db = sqlite3.connect(study_store)
    db.row_factory = sqlite3.Row
    stored = db.execute(
        "SELECT p.* FROM predictions p JOIN units u USING (unit_id) WHERE p.variant = 'mask' AND p.layer = 2 "
        "AND json_extract(u.spec, '$.condition') = 'instructions+examples' AND json_extract(u.spec, '$.seed') = 1 "
        "AND json_extract(u.spec, '$.kind') = 'mask' ORDER BY p.item"
    ).fetchall()
    db.close()
    assert [json.loads(r["prompt_token_ids"]) for r in stored] == [it.prompt.ids for it in items]
    assert [r["reference"] for r in stored] == [it.reference for it in items]
    assert [r["raw_generation"] for r in stored] == [o.text for o in outputs]
    assert [r["generation"] for r in stored] == [o.answer for o in outputs]


def test_mistakes_are_user_errors(tmp_path, data_dir):
    lm = tiny("llama")
    items = api.prompts(lm, "flores", pair="fra-eng", k=1, n_test=1, data_dir=data_dir)
    with pytest.raises(api.UserError, match="engine must be"):
        api.generate(lm, items, api.MaskFrom(0), engine="warp")
    with pytest.raises(api.UserError, match="unknown condition"):
        api.prompts(lm, "flores", pair="fra-eng", condition="bogus", data_dir=data_dir)
    with pytest.raises(api.UserError, match="unknown sweep setting"):
        api.sweep({"pairz": ["fra-eng"]}, tmp_path / "s.sqlite")
    with pytest.raises(api.UserError, match="sweep setting ks must be a list of int, got '2'"):
        api.sweep({"ks": "2"}, tmp_path / "s.sqlite")
    with pytest.raises(api.UserError, match="sweep setting n_test must be int or null, got '8'"):
        api.plan({"n_test": "8"}, tflops=1.0)
    with pytest.raises(api.UserError, match="does not exist"):
        api.open_store(tmp_path / "none.sqlite")
    with pytest.raises(api.UserError, match="unknown run setting.*pairz"):
        api.run({"pairz": "fra-eng"})
    with pytest.raises(api.UserError, match="prune settings: .*layer"):
        api.prune({"model": "tiny:llama"})
    with pytest.raises(api.UserError, match="does not exist"):
        api.report(tmp_path / "none.sqlite")


def test_settings_of_the_wrong_shape_are_user_errors(tmp_path, monkeypatch, capsys):
    """Found in review: a bad Ray key, another command's dataclass, a report format the command line's choices
    refuse, --bootstrap 0 or --fraction 1.5, and a LoRA dict (which the README says every command takes) raised
    TypeError, AttributeError or IndexError, or wrote a Markdown report; none of these loads a model."""
    with pytest.raises(api.UserError, match="unknown ray setting.*wrkers"):
        api.plan({"model": "tiny:llama"}, ray={"wrkers": 2})
    with pytest.raises(api.UserError, match="must be a RunSettings or a dict"):
        api.run(api.BenchSettings(model="tiny:llama"))
    with pytest.raises(api.UserError, match="report format must be one of html, md, got 'pdf'"):
        api.report(tmp_path / "none.sqlite", format="pdf")
    with pytest.raises(api.UserError, match="--bootstrap must be >= 1"):  # was an IndexError from numpy
        api.report(tmp_path / "none.sqlite", bootstrap=0)
    assert main(["report", str(tmp_path / "none.sqlite"), "--fraction", "1.5"]) == 2
    assert "--fraction must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(api.UserError, match="unknown lora_sweep setting.*epochs"):
        api.lora_sweep({"model": "tiny:llama", "epochs": 1})  # the field is max_epochs (--epochs on the command line)
    seen = []
    monkeypatch.setattr(api, "run_lora_sweep", lambda run, command, ray: seen.append(run) or ([], Path("s")))
    flat = {"model": "tiny:llama", "layers": "0,2", "train_size": 4, "max_epochs": 1, "preset": "paper"}
    api.lora_sweep(flat)
    api.lora_sweep(
        {"model": "tiny:llama", "layers": "0,2", "preset": "paper", "settings": {"train_size": 4, "max_epochs": 1}}
    )
    expected = api.LoraRun(
        settings=lora_settings("paper", {"train_size": 4, "max_epochs": 1}),
        preset="paper",
        model="tiny:llama",
        layers="0,2",
    )
    assert seen == [expected, expected]


def test_the_package_exposes_the_api_lazily():
    assert icl_locate.__all__ == api.__all__
    assert all(getattr(icl_locate, name) is getattr(api, name) for name in api.__all__)
    with pytest.raises(AttributeError):
        icl_locate.no_such_name  # noqa: B018
    check = (
        "import icl_locate, sys; heavy = {'torch', 'transformers', 'pandas'} & set(sys.modules); "
        "assert not heavy, heavy; assert 'load_model' in dir(icl_locate)"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
