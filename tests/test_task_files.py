"""Task files, verbatim data reading, the metrics they name, and the weak-baseline verdict."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from icl_locate.cli import main
from icl_locate.core.prompts import FORMATS, Example, build_prompt
from icl_locate.experiments.settings import WorkUnit
from icl_locate.results.analysis import Curve, analyse_curve, savings
from icl_locate.tasks.files import read_table
from icl_locate.tasks.loaders import load_data
from icl_locate.tasks.metrics import Chrf, ExactMatch, Normalise, make_metric
from icl_locate.tasks.registry import get_task
from icl_locate.tasks.spec import TaskOptions
from icl_locate.tasks.taskfile import load_task_file
from icl_locate.util.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def ex(target: str, i: int = 0) -> Example:
    return Example(str(i), "src", target)


# --------------------------------------------------------------------------- metrics, by hand


def test_exact_match_by_hand():
    m = ExactMatch()
    s = m.score(
        ["Paris", " paris. ", "Lyon", "New  York!"], [ex("Paris"), ex("Paris"), ex("Paris"), ex("new york")], None
    )
    assert s.sentence == [1.0, 1.0, 0.0, 1.0] and s.corpus["exact_match"] == 75.0
    strict = make_metric({"name": "exact_match", "lowercase": False, "strip_punctuation": False})
    assert strict.score(["paris", "Paris!"], [ex("Paris"), ex("Paris")], None).corpus["exact_match"] == 0.0
    assert m.aggregate(np.array([[1.0], [0.0]])) == 50.0


def test_accuracy_by_hand():
    m = make_metric({"name": "accuracy", "labels": ["positive", "negative"], "label_words": {"positive": ["good"]}})
    s = m.score(
        ["Positive!", "good movie", "negative", "neutral", ""],
        [ex("positive"), ex("positive"), ex("positive"), ex("negative"), ex("negative")],
        None,
    )
    assert s.sentence == [1.0, 1.0, 0.0, 0.0, 0.0] and s.corpus["accuracy"] == 40.0
    assert [d["predicted_label"] for d in s.details] == ["positive", "positive", "negative", None, None]


def test_chrf_statistics_aggregate_to_sacrebleu():
    from sacrebleu.metrics import CHRF

    hyps, refs = ["the cat sat", "a dog ran away now"], ["the cat sat down", "the dog ran away"]
    s = Chrf().score(hyps, [ex(r) for r in refs], None)
    assert s.corpus["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert Chrf().aggregate(np.array(s.stats)[:1]) == pytest.approx(CHRF().corpus_score(hyps[:1], [refs[:1]]).score)


def test_normalise_steps():
    assert Normalise()("  Le  Caire, «Égypte» ") == "le caire égypte"
    assert Normalise(strip_accents=True)("Égypte") == "egypte"


# --------------------------------------------------------------------------- files, verbatim

NASTY = [
    '"Bonjour," dit-il.\t"Hello," he said.',
    "«\xa0Merci\xa0»\t“Thanks”",
    "'single'\t  spaced  target  ",
    'un "guillemet\tan "unclosed quote',
]


@pytest.mark.parametrize("crlf,bom", [(False, False), (True, False), (False, True), (True, True)])
def test_tsv_read_verbatim(tmp_path, crlf, bom):
    lines = NASTY[:2] + [""] + NASTY[2:] + ["", ""]
    text = ("\r\n" if crlf else "\n").join(lines) + ("\r\n" if crlf else "\n")
    path = tmp_path / "pairs.tsv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    table = read_table(path, {"source": 1, "target": 2})
    assert len(table.records) == len(NASTY) and table.empty_lines == 3
    expected = [tuple(line.split("\t")) for line in NASTY]
    assert [(r.fields["source"], r.fields["target"]) for r in table.records] == expected
    assert table.summary("pairs") == f"read 4 pairs from {path}, 3 empty lines skipped"


def test_jsonl_with_tabs_and_newlines_in_fields(tmp_path):
    rows = [{"source": "a\tb", "target": "line1\nline2"}, {"source": '"q"', "target": "«»", "id": "x7"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    data = load_data(get_task("bitext"), TaskOptions(bank_path=str(path), test_path=str(path)))
    assert [(e.source, e.target) for e in data.bank] == [(r["source"], r["target"]) for r in rows]
    assert [e.id for e in data.test] == ["pairs.jsonl:1", "x7"]
    assert data.notes == [f"read 2 pairs from {path}, 1 empty line skipped"] * 2


@pytest.mark.parametrize(
    "content,message",
    [
        (b"a\tb\nc\td\te\n", "pairs.tsv:2: expected 2 tab-separated columns, found 3"),
        (b"a\tb\nonly one column\n", "pairs.tsv:2: expected 2 tab-separated columns, found 1"),
        (b"a\tb\nc\xff\td\n", "not UTF-8 at byte offset 5"),
    ],
)
def test_malformed_data_files_one_line(tmp_path, content, message):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        load_data(get_task("bitext"), TaskOptions(bank_path=str(path), test_path=str(path)))


# --------------------------------------------------------------------------- task files


def write_task(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "bank.tsv").write_text("".join(f"question {i}\tanswer {i}\n" for i in range(20)))
    (tmp_path / "test.tsv").write_text("".join(f"query {i}\tanswer {i}\n" for i in range(8)))
    spec = dict(
        name="toy",
        data=dict(bank="bank.tsv", test="test.tsv"),
        prompt=dict(q="Q:", a=" A:"),
        stop=["\n"],
        cut=["Q:"],
        max_new_tokens=4,
        metric="exact_match",
    )
    for key, value in overrides.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    path = tmp_path / "task.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(metric=None), "missing metric"),
        (dict(metric="rouge"), "unknown metric 'rouge'"),
        (dict(metric={"name": "accuracy"}), "accuracy needs labels"),
        (dict(metric={"name": "accuracy", "labels": ["yes", "no"]}), "label 'answer 0' of record 1 is not one of"),
        (dict(data=dict(bank="bank.tsv", test="test.tsv", bank_lines="5-3")), "bank_lines: a range runs from 1"),
        (dict(data=dict(bank="bank.tsv", test="test.tsv", bank_lines="1-500")), "bank_lines 1-500"),
        (dict(data=dict(bank="missing.tsv", test="test.tsv")), "file not found"),
        (dict(prompt=dict(q="Q:")), "prompt needs q and a"),
        (dict(colour="blue"), "unknown key(s) colour"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    ],
)
def test_malformed_task_files_one_line(tmp_path, capsys, overrides, message):
    path = write_task(tmp_path, **overrides)
    code = main(["run", "--model", "tiny:llama", "--task", str(path), "--k", "1", "--n-test", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("icl-locate: error")]
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_paper_prompts_unchanged_through_task_specs():
    shots = [Example("1", " Bonjour le monde ", "Hello world"), Example("2", "Merci", "Thanks ")]
    for task, fmt, header in (
        ("flores", "instr_machine_translation", "Translate French to English:"),
        ("humaneval", "instr_code_gen", "Write a program for the following task:\n"),
        ("bitext", "instr_none_QA", ""),
    ):
        old = build_prompt(FORMATS[fmt], shots, "Une question", header=header)
        new = build_prompt(get_task(task).prompt_format, shots, "Une question", header=header)
        assert (new.text, new.char_spans) == (old.text, old.char_spans), task
    assert get_task("flores").prompt_format.header == FORMATS["instr_machine_translation"].header


def test_bitext_with_languages_gets_the_translation_format(tmp_path):
    (tmp_path / "p.tsv").write_text("chat\tcat\nchien\tdog\n")
    task = get_task("bitext", "fra", "eng_Latn")
    data = load_data(
        task,
        TaskOptions(
            bank_path=str(tmp_path / "p.tsv"), test_path=str(tmp_path / "p.tsv"), src_lang="fra", tgt_lang="eng_Latn"
        ),
    )
    assert task.prompt_format.header == "Translate <L1> to <L2>:" and (data.l1, data.l2) == ("French", "English")
    assert task.stop_strings == ("\n",) and data.language == "en"


def test_example_task_files_load(data_dir):
    capitals = load_task_file(EXAMPLES / "capitals" / "capitals.yaml")
    data = load_data(capitals, TaskOptions())
    assert (len(data.bank), len(data.test)) == (36, 64) and data.test[0].target == "Doha"
    sentiment = load_task_file(EXAMPLES / "sentiment" / "sentiment.yaml")
    data = load_data(sentiment, TaskOptions())
    assert {e.target for e in data.test} == {"positive", "negative"} and data.test[0].id.startswith(("pos", "neg"))


def test_builtin_unit_ids_unchanged_and_user_data_has_its_own():
    unit = WorkUnit("flores", "fra-eng", "mask", "examples", True, 0, 5, 16, (0, 1, 2))
    older = ("data", "from_layer", "labels", "top_heads")  # fields added after the first units were stored
    spec = {k: v for k, v in asdict(unit).items() if k not in older}
    assert unit.unit_id == hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    other = WorkUnit("flores", "fra-eng", "mask", "examples", True, 0, 5, 16, (0, 1, 2), data="abc")
    assert other.unit_id != unit.unit_id


def test_sweep_and_report_on_a_task_file(tmp_path, capsys):
    path = write_task(tmp_path)
    store = tmp_path / "s.sqlite"
    argv = [
        "sweep",
        "--model",
        "tiny:llama",
        "--task",
        str(path),
        "--conditions",
        "instructions+examples",
        "--seeds",
        "0",
        "--ks",
        "2",
        "--layers",
        "0,2,4",
        "--store",
        str(store),
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "read 20 pairs from" in err and "sweep finished: 1 units run" in out
    assert "no recognition layer" in out  # a random tiny model learns nothing in context
    db = sqlite3.connect(store)
    assert {m for (m,) in db.execute("SELECT DISTINCT metric FROM scores")} == {"exact_match"}
    spec = json.loads(db.execute("SELECT spec FROM units").fetchone()[0])
    db.close()
    assert spec["task"] == "toy" and len(spec["data"]) == 16
    (tmp_path / "test.tsv").write_text("".join(f"query {i}\tanswer {i + 1}\n" for i in range(8)))  # other data
    assert main(argv) == 0 and "sweep finished: 1 units run" in capsys.readouterr().out  # not taken as done
    assert main(["report", str(store), "--out-dir", str(tmp_path / "rep"), "--format", "md", "--bootstrap", "20"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "exact_match" in text and "no recognition layer" in text


# --------------------------------------------------------------------------- the verdict


def curve_from(p_by_layer, items=80) -> Curve:
    """Exactly round(p x items) correct items at each layer (the same items stay correct as p grows)."""
    stats = np.stack([np.stack([(np.arange(items)[:, None] < round(p * items)).astype(float) for p in p_by_layer])])
    return Curve(
        key=dict(
            task="t",
            pair="",
            kind="mask",
            condition="instructions+examples",
            instructions=True,
            k=5,
            n_test=items,
            data="",
        ),
        layers=list(range(len(p_by_layer))),
        metric=ExactMatch(),
        seeds=[0],
        item_stats=stats,
        context_tokens=300.0,
        query_tokens=60.0,
    )


def test_weak_baseline_gets_no_recognition_layer():
    c = analyse_curve(curve_from([0.05, 0.05, 0.06, 0.05, 0.06]), n_boot=300)
    assert c.recognition is None and savings(c, 4) is None
    assert c.verdict.startswith("no recognition layer: baseline") and "is not above masked-from-0" in c.verdict


def test_curve_that_never_returns_says_so():
    c = analyse_curve(curve_from([0.0, 0.1, 0.2, 0.3, 0.9]), n_boot=300)
    assert c.recognition is None and "stays below 95% of the baseline" in c.verdict


def test_clear_curve_is_located():
    c = analyse_curve(curve_from([0.0, 0.05, 0.9, 0.9, 0.9]), n_boot=300)
    assert c.recognition == 2 and c.verdict.startswith("recognition layer 2") and savings(c, 4) is not None


def test_bench_and_prune_take_a_task_file(tmp_path, capsys):
    path = write_task(tmp_path)
    assert (
        main(
            [
                "bench",
                "--model",
                "tiny:llama",
                "--task",
                str(path),
                "--n-test",
                "2",
                "--layers",
                "0,4",
                "--k",
                "2",
                "--skip-paper",
                "--require-identical",
                "1.0",
            ]
        )
        == 0
    )
    assert "read 20 pairs from" in capsys.readouterr().err
    out = tmp_path / "prune.json"
    assert (
        main(
            [
                "prune",
                "--model",
                "tiny:llama",
                "--task",
                str(path),
                "--n-test",
                "2",
                "--k",
                "2",
                "--layer",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["metric"] == "exact_match" and data["identical_to_masked"] == 2
