"""The command line on tiny models and real data: outputs, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from icl_locate.cli import main
from icl_locate.cli_args import build_parser
from icl_locate.cli_values import settings_from


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_writes_predictions(tmp_path, capsys, data_dir):
    out = tmp_path / "run.jsonl"
    code, stdout, _ = run_cli(
        capsys,
        "run",
        "--model",
        "tiny:llama",
        "--pair",
        "fra-eng",
        "--condition",
        "instructions+examples",
        "--from-layer",
        "1",
        "--n-test",
        "2",
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    )
    assert code == 0 and "corpus BLEU" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for key in (
        "example_id",
        "condition",
        "from_layer",
        "prompt",
        "prompt_token_ids",
        "masked_token_ranges",
        "generation",
        "reference",
        "sentence_bleu",
        "in_context_example_ids",
    ):
        assert key in rows[0]
    assert rows[0]["masked_layers"] == [1, 2, 3] and rows[0]["from_layer"] == 1
    ((start, end),) = rows[0]["masked_token_ranges"]
    assert start == 1 and end < len(rows[0]["prompt_token_ids"])  # BOS visible, query visible


def test_run_from_last_layer_masks_nothing(tmp_path, capsys, data_dir):
    out = tmp_path / "run.jsonl"
    code, _, _ = run_cli(
        capsys,
        "run",
        "--model",
        "tiny:llama",
        "--pair",
        "fr-en",
        "--condition",
        "TTF",
        "--from-layer",
        "4",
        "--n-test",
        "1",
        "--k",
        "1",
        "--max-new-tokens",
        "2",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    )
    row = json.loads(out.read_text())
    assert code == 0 and row["masked_token_ranges"] == [] and row["masked_layers"] == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--model", "tiny:llama", "--pair", "fra-eng", "--condition", "bogus"], "unknown condition"),
        (["run", "--model", "tiny:llama", "--pair", "fra-xyz"], "unknown language code 'xyz'"),
        (["run", "--model", "tiny:llama", "--pair", "fra-deu", "--data-dir", "/nonexistent"], "does not exist"),
        (
            ["run", "--model", "tiny:llama", "--pair", "fra-eng", "--condition", "TTF", "--from-layer", "9"],
            "--from-layer must be in 0..4",
        ),
        (["run", "--model", "tiny:llama", "--pair", "fra-eng", "--out", "/nonexistent/dir/x.jsonl"], "does not exist"),
        (["run", "--bogus-flag"], "unrecognized arguments"),
        (["score-code", "--samples", "/nonexistent.jsonl"], "samples file not found"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message, capsys, data_dir):
    if "--data-dir" not in argv and argv[0] == "run":
        argv = argv + ["--data-dir", str(data_dir)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("icl-locate: error:")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--model", "tiny:llama", "--pair", "fra-eng", "--out", "{file}/x.jsonl"],
        ["sweep", "--model", "tiny:llama", "--pairs", "fra-eng", "--store", "{file}/s.sqlite"],
        ["startup", "--model", "tiny:llama", "--json", "{file}/s.json"],
    ],
)
def test_an_output_path_through_a_file_is_one_line_before_any_work(argv, tmp_path, capsys, data_dir, monkeypatch):
    """Where a file stands where a directory should, the line says so (not that the directory does not exist), and
    no work is started (``startup`` measures for a minute before writing)."""
    from icl_locate.experiments import startup

    monkeypatch.setattr(startup, "run_startup", lambda *a, **kw: pytest.fail("measured before checking --json"))
    (tmp_path / "a-file").write_text("")
    argv = [arg.format(file=tmp_path / "a-file") for arg in argv]
    code, _, err = run_cli(capsys, *argv, *(["--data-dir", str(data_dir)] if argv[0] != "startup" else []))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"{tmp_path / 'a-file'} is not a directory" in lines[0]


def test_a_data_directory_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    code, _, err = run_cli(
        capsys, "run", "--model", "tiny:llama", "--pair", "fra-eng", "--data-dir", str(tmp_path / "a-file")
    )
    assert code == 2 and f"data directory {tmp_path / 'a-file'} is not a directory" in err


def test_missing_language_file_exit_2(tmp_path, capsys):
    (tmp_path / "flores200" / "dev").mkdir(parents=True)
    code, _, err = run_cli(capsys, "run", "--model", "tiny:llama", "--pair", "fra-eng", "--data-dir", str(tmp_path))
    assert code == 2 and "FLORES dev file for French (fra_Latn) not found" in err


def test_json_files_are_standard_json(tmp_path):
    """A figure that is NaN or infinite (skipped, undefined) is written as null, numpy and torch scalars as numbers:
    the files parse with a strict reader (Python's NaN literal is not JSON)."""
    from icl_locate.util.fileio import write_json_atomic, write_jsonl_atomic

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    scalars = [np.float32(1.5), torch.tensor(2.0), np.int64(8), torch.tensor(True), np.float64("nan")]
    data = dict(nan=float("nan"), inf=float("inf"), rows=[-float("inf"), *scalars], n=3)
    write_json_atomic(tmp_path / "a.json", data)
    write_jsonl_atomic(tmp_path / "a.jsonl", [data])
    expected = dict(nan=None, inf=None, rows=[None, 1.5, 2.0, 8, True, None], n=3)
    for name in ("a.json", "a.jsonl"):
        kept = strict((tmp_path / name).read_text())
        assert kept == expected and type(kept["rows"][3]) is int and kept["rows"][4] is True


def test_results_are_all_or_nothing(tmp_path):
    from icl_locate.util.fileio import write_jsonl_atomic

    out = tmp_path / "run.jsonl"
    out.write_text("previous results\n")
    with pytest.raises(TypeError):
        write_jsonl_atomic(out, [{"ok": 1}, {"bad": object()}])  # fails half-way through
    assert out.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.jsonl"]  # no temporary file left behind
    write_jsonl_atomic(out, [{"ok": 1}])
    assert out.read_text() == '{"ok": 1}\n'


def test_score_code_command(tmp_path, capsys):
    from icl_locate.tasks.data import humaneval_problems

    problems = humaneval_problems()[:3]
    samples = tmp_path / "samples.jsonl"
    records = [{"task_id": p["task_id"], "completion": p["prompt"] + p["canonical_solution"]} for p in problems[:2]]
    records.append({"task_id": problems[2]["task_id"], "completion": "while True:\n    pass\n"})
    samples.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    code, out, _ = run_cli(capsys, "score-code", "--samples", str(samples))
    assert code == 0 and "pass@1 = 66.7%" in out and "1 timed out" in out
    results = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["passed", "passed", "timed out"]


def test_listing_commands(capsys):
    assert run_cli(capsys, "tasks")[1].count("\n") >= 3
    assert "TTF" in run_cli(capsys, "conditions")[1]
    assert "meta-llama/Llama-3.1-8B" in run_cli(capsys, "models")[1]


def _parsers(parser: argparse.ArgumentParser):
    """The parser and every subparser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_option_has_help():
    missing = [
        f"{parser.prog} {action.dest}"
        for parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and not (action.help or "").strip()
    ]
    assert missing == []


def test_help_shows_the_settings_defaults(capsys):
    """argparse leaves options at None; the settings dataclasses own the defaults --help shows."""
    from icl_locate.core.catalog import EMBEDDED
    from icl_locate.experiments.options import PruneSettings, RunSettings

    for command, cls in (("run", RunSettings), ("prune", PruneSettings)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"(default {EMBEDDED})" in text and f"{cls.__dataclass_fields__['k'].default}" in text
    args = build_parser().parse_args(["prune", "--layer", "3"])
    assert args.n_test is None and settings_from(args, PruneSettings).n_test == PruneSettings(layer=3).n_test


def test_score_code_report_and_executor_defaults_come_from_the_settings():
    """score-code's, report's and the executor's defaults are the settings dataclasses' (argparse: None)."""
    import inspect

    from icl_locate.experiments.options import ExecutorSettings, ReportSettings, ScoreCodeSettings
    from icl_locate.results.analysis import DEFAULT_FRACTION
    from icl_locate.results.report import build_report

    parser = build_parser()
    args = parser.parse_args(["score-code", "--samples", "s.jsonl"])
    assert args.workers is None and args.timeout is None
    assert settings_from(args, ScoreCodeSettings) == ScoreCodeSettings(samples="s.jsonl", workers=2, timeout=3.0)
    args = parser.parse_args(["report", "study.db"])
    assert args.fraction is None and args.bootstrap is None
    report = settings_from(args, ReportSettings)
    assert (report.format, report.fraction, report.bootstrap) == ("html", 0.95, 1000)
    library = inspect.signature(build_report).parameters  # the report library's own defaults agree
    assert (library["fraction"].default, library["n_boot"].default) == (DEFAULT_FRACTION, report.bootstrap)
    assert report.fraction == DEFAULT_FRACTION
    args = parser.parse_args(["sweep", "--store", "s.db"])
    assert args.executor is None and settings_from(args, ExecutorSettings).executor == "local"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"n_test: 4\nmodel: caf\xe9\n", "not UTF-8 at byte offset"),
        (b"n_test: [4\n", "is not valid YAML"),
        (b"- 1\n- 2\n", "a sweep config holds a mapping"),
        (b"n_tset: 4\n", "unknown sweep setting(s) n_tset"),
    ],
)
def test_a_bad_sweep_config_is_one_error_line(tmp_path, capsys, content, message):
    config = tmp_path / "sweep.yaml"
    config.write_bytes(content)
    assert main(["sweep", "--store", str(tmp_path / "s.sqlite"), "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s.sqlite").exists()


def test_an_empty_sweep_config_keeps_the_defaults(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_bytes(b"")
    from icl_locate.experiments.settings import SweepConfig, load_config

    assert load_config(None, str(config)) == SweepConfig()
