"""Label variants of the examples (core/labels.py, tasks/items.py): prompt bytes, determinism, the
abstract mapping and its scoring, the sweep axis and unit ids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from icl_locate.core.labels import LabelSpace, abstract_map, derangement, relabel
from icl_locate.core.prompts import Example
from icl_locate.experiments.planning import plan_units
from icl_locate.experiments.settings import SweepConfig, WorkUnit, validate
from icl_locate.tasks.items import build_items, label_space, labelled_task
from icl_locate.tasks.loaders import load_data
from icl_locate.tasks.spec import TaskData, TaskOptions
from icl_locate.tasks.taskfile import load_task_file, parse_task
from icl_locate.util.errors import UserError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TWO_LABELS = dict(
    name="two-labels",
    data={  # parse_task checks the files exist; the tests pass their own TaskData
        "bank": str(EXAMPLES / "sentiment" / "bank.jsonl"),
        "test": str(EXAMPLES / "sentiment" / "test.jsonl"),
        "fields": {"source": "text", "target": "label"},
    },
    prompt={"header": "Classify:", "q": "Sentence:", "a": "\nSentiment:", "sep": "\n"},
    stop=["\n"],
    metric={"name": "accuracy", "labels": ["positive", "negative"]},
)
BANK = [
    Example("b1", "Great film.", "positive"),
    Example("b2", "Dull plot.", "negative"),
    Example("b3", "Lovely day.", "positive"),
    Example("b4", "Cold soup.", "negative"),
]
TEST = [Example("t1", "Nice cake.", "positive"), Example("t2", "Bad wine.", "negative")]


class CharTokenizer:
    """Enough of a tokenizer for prompt building: one token per character, BOS first."""

    all_special_ids = [0]

    def __call__(self, text, return_offsets_mapping=True, add_special_tokens=True):
        return {
            "input_ids": [0] + [ord(c) + 1 for c in text],
            "offset_mapping": [(0, 0)] + [(i, i + 1) for i in range(len(text))],
        }


def texts(labels: str, seed: int = 0, k: int = 4, task_raw=TWO_LABELS, bank=BANK, test=TEST) -> list[str]:
    task = parse_task(task_raw, "test")
    items = build_items(task, TaskData(bank, test), CharTokenizer(), k, seed, labels=labels)
    return [it.prompt.text for it in items]


PROMPT_SEED0 = (  # seed 0 draws the four bank examples in this order; the variants change the answers only
    "Classify:\nSentence:Cold soup.\nSentiment:{} \nSentence:Dull plot.\nSentiment:{} \n"
    "Sentence:Great film.\nSentiment:{} \nSentence:Lovely day.\nSentiment:{} \nSentence:Nice cake.\nSentiment:"
)


def test_prompt_bytes_of_each_variant_on_a_two_label_task():
    """Only the examples' answers change; the inputs, their order, the format and the query stay."""
    assert texts("gold")[0] == PROMPT_SEED0.format("negative", "negative", "positive", "positive")
    assert texts("random")[0] == PROMPT_SEED0.format("positive", "positive", "positive", "positive")
    assert texts("shuffled")[0] == PROMPT_SEED0.format("positive", "positive", "negative", "negative")
    assert texts("abstract")[0] == PROMPT_SEED0.format("8", "8", "9", "9")
    # every query of a seed shares its examples, answers included (prefix caches stay shared)
    for variant in ("gold", "random", "shuffled", "abstract"):
        first, second = texts(variant)
        assert first.rsplit("Sentence:", 1)[0] == second.rsplit("Sentence:", 1)[0]


def test_variants_are_deterministic_per_seed_and_differ_across_seeds():
    for variant in ("random", "shuffled", "abstract"):
        assert texts(variant, seed=3) == texts(variant, seed=3)
    draws = {tuple(texts("random", seed=s)) for s in range(8)}
    assert len(draws) > 1


def test_abstract_maps_the_references_and_the_metric():
    task = parse_task(TWO_LABELS, "test")
    data = TaskData(BANK, TEST)
    items = build_items(task, data, CharTokenizer(), 4, 0, labels="abstract")
    mapping = abstract_map(label_space(task, data), 0)
    assert sorted(mapping) == ["negative", "positive"] and len(set(mapping.values())) == 2
    assert [it.item.target for it in items] == [mapping["positive"], mapping["negative"]]
    scored_task = labelled_task(task, data, "abstract", 0)
    assert scored_task.metric.labels == (mapping["positive"], mapping["negative"])
    scored = scored_task.metric.score([mapping["positive"], "positive"], [it.item for it in items], data)
    assert scored.sentence == [1.0, 0.0]  # the symbol is right; the word the examples no longer use is not
    assert labelled_task(task, data, "random", 0) is task
    # a task file's own symbols
    own = dict(TWO_LABELS, abstract_labels=["foo", "bar"])
    assert set(abstract_map(label_space(parse_task(own, "test"), data), 0).values()) == {"foo", "bar"}


def test_a_translation_task_random_and_shuffled_use_other_answers():
    raw = dict(
        name="mt",
        data={"bank": str(EXAMPLES / "capitals" / "bank.tsv"), "test": str(EXAMPLES / "capitals" / "test.tsv")},
        prompt={"header": "Translate French to English:", "q": "Q:", "a": "A:"},
        metric="bleu",
    )
    bank = [Example("1", "Bonjour.", "Hello."), Example("2", "Merci.", "Thanks."), Example("3", "Oui.", "Yes.")]
    test = [Example("9", "Non.", "No.")]
    gold = texts("gold", k=3, task_raw=raw, bank=bank, test=test)[0]
    assert gold == ("Translate French to English:\nQ:Merci.A:Thanks. \nQ:Oui.A:Yes. \nQ:Bonjour.A:Hello. \nQ:Non.A:")
    assert texts("shuffled", k=3, task_raw=raw, bank=bank, test=test)[0] == (
        "Translate French to English:\nQ:Merci.A:Yes. \nQ:Oui.A:Hello. \nQ:Bonjour.A:Thanks. \nQ:Non.A:"
    )
    assert texts("random", k=3, task_raw=raw, bank=bank, test=test)[0] == (
        "Translate French to English:\nQ:Merci.A:Hello. \nQ:Oui.A:Hello. \nQ:Bonjour.A:Thanks. \nQ:Non.A:"
    )
    shots = relabel(bank, "random", LabelSpace((), tuple(e.target for e in bank)), 0)
    assert all(s.target != e.target and s.target in {"Hello.", "Thanks.", "Yes."} for s, e in zip(shots, bank))
    assert [s.source for s in shots] == [e.source for e in bank]
    with pytest.raises(UserError, match="label set"):
        texts("abstract", k=3, task_raw=raw, bank=bank, test=test)


def test_jsonl_task_file_variants(tmp_path):
    """The shipped JSONL task: every random answer is a label; shuffled keeps the gold answers' multiset."""
    task = load_task_file(EXAMPLES / "sentiment" / "sentiment.yaml")
    data = load_data(task, TaskOptions())
    gold = build_items(task, data, CharTokenizer(), 5, 1, n_test=2)
    for variant in ("random", "shuffled", "abstract"):
        items = build_items(task, data, CharTokenizer(), 5, 1, n_test=2, labels=variant)
        assert [it.prompt.text.split("Sentence:")[1:] != [] for it in items] == [True, True]
        answers = [line.split("Sentiment:")[1].strip() for line in items[0].prompt.text.split("\n")[2::2][:5]]
        gold_answers = [line.split("Sentiment:")[1].strip() for line in gold[0].prompt.text.split("\n")[2::2][:5]]
        if variant == "random":
            assert set(answers) <= {"positive", "negative"}
        if variant == "shuffled":
            assert Counter(answers) == Counter(gold_answers)
        if variant == "abstract":
            assert set(answers) <= set(abstract_map(label_space(task, data), 1).values())
        assert items[0].prompt.text.count("\n") == gold[0].prompt.text.count("\n")


def test_derangement_moves_every_answer_where_possible():
    import random

    for seed in range(20):
        out = derangement(["a", "b", "c", "d"], random.Random(seed))
        assert sorted(out) == ["a", "b", "c", "d"] and all(x != y for x, y in zip(out, "abcd"))
    out = derangement(["p", "p", "p", "n", "n"], random.Random(0))  # no full derangement exists
    assert Counter(out) == Counter("pppnn") and sum(x != y for x, y in zip(out, "pppnn")) == 4


def test_sweep_axis_and_unit_ids():
    """--labels makes one unit per variant; gold units keep the ids they had before the axis existed."""
    old = WorkUnit("flores", "fra-eng", "mask", "instructions+examples", True, 0, 5, 8, tuple(range(19)))
    assert old.unit_id == "8384d2688eff1356"
    assert WorkUnit("sentiment", "", "mask", "examples", False, 1, 4, None, (0, 3, 18), "abcdef0123456789").unit_id == (
        "9c26e0ad37943914"
    )
    restore = WorkUnit("flores", "fra-eng", "restore", "instructions+examples", True, 0, 5, 8, (9, 10), "", 9)
    assert restore.unit_id == "724801de5eb369a8"
    task = str(EXAMPLES / "sentiment" / "sentiment.yaml")
    units = plan_units(SweepConfig(task=task, labels=["gold", "random", "abstract"], layers="0,18"), 18)
    assert [u.labels for u in units] == ["gold", "random", "abstract"]
    assert len({u.unit_id for u in units}) == 3 and units[0].unit_id != units[1].unit_id
    assert "labels=random" in units[1].label()
    with pytest.raises(UserError, match="unknown label variant"):
        validate(SweepConfig(task=task, labels=["gold", "wrong"]))
    with pytest.raises(UserError, match="abstract needs a task with a label set"):
        validate(SweepConfig(task=str(EXAMPLES / "capitals" / "capitals.yaml"), labels=["abstract"]))


def test_label_variants_swept_stored_resumed_and_reported(tmp_path, capsys):
    import json
    import sqlite3

    from icl_locate.cli import main

    store = tmp_path / "s.sqlite"
    argv = ["sweep", "--model", "tiny:llama", "--task", str(EXAMPLES / "sentiment" / "sentiment.yaml")]
    argv += ["--conditions", "examples", "--labels", "gold,random,abstract", "--ks", "2", "--n-test", "4"]
    argv += ["--layers", "0,2,4", "--audit", "0", "--store", str(store)]
    assert main(argv) == 0
    assert "sweep finished: 3 units run" in capsys.readouterr().out
    db = sqlite3.connect(store)
    specs = [json.loads(s) for (s,) in db.execute("SELECT spec FROM units")]
    abstract_refs = {r for (r,) in db.execute("SELECT DISTINCT reference FROM predictions")}
    db.close()
    assert sorted(s["labels"] for s in specs) == ["abstract", "gold", "random"]
    assert abstract_refs - {"positive", "negative"}  # the abstract unit scores against its symbols
    assert main(argv) == 0 and "0 units run" in capsys.readouterr().out  # resumed: nothing to redo
    assert main(["report", str(store), "--out-dir", str(tmp_path / "rep"), "--format", "md", "--bootstrap", "20"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    section = text.split("## Label variants")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| sentiment")]
    assert [row.split(" | ")[2] for row in rows] == ["gold", "random", "abstract"]
    assert "k=2, abstract labels" in text  # the per-layer table names the variant
    assert (tmp_path / "rep" / "mask_sentiment_all_k2.png").is_file()  # the variants' panels, side by side


def test_run_takes_a_label_variant_and_refuses_abstract_without_labels(capsys):
    from icl_locate.cli import main

    capitals = str(EXAMPLES / "capitals" / "capitals.yaml")
    argv = ["run", "--model", "tiny:llama", "--task", capitals, "--n-test", "1", "--k", "2"]
    assert main([*argv, "--labels", "shuffled", "--condition", "answers", "--from-layer", "1"]) == 0
    assert "condition answers from layer 1 | k=2 seed=0 shuffled labels" in capsys.readouterr().err
    assert main([*argv, "--labels", "abstract"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "label set" in err[-1] and not [line for line in err[:-1] if "error" in line or "Loading" in line]
