"""FLORES/MBPP/HumanEval loading, task registry, metrics."""

from __future__ import annotations

import pytest

from icl_locate.tasks.data import flores_bitext, flores_file, parse_pair, resolve_language
from icl_locate.tasks.items import build_items, post_process
from icl_locate.tasks.loaders import humaneval_query, load_data
from icl_locate.tasks.metrics import first_sentence, pass_at_1, translation_scores
from icl_locate.tasks.registry import TASKS, get_task
from icl_locate.tasks.spec import TaskOptions
from icl_locate.util.errors import UserError


def _tree(root, layout: str):
    """A tiny FLORES-like tree in one of the supported layouts."""
    files = {
        "flores200": {"dev/fra_Latn.dev": "un\ndeux\n", "dev/eng_Latn.dev": "one\ntwo\n"},
        "flores101": {"dev/fra.dev": "un\ndeux\n", "dev/eng.dev": "one\ntwo\n"},
        "flat": {"fra_Latn.dev": "un\ndeux\n", "eng_Latn.dev": "one\ntwo\n"},
    }[layout]
    base = {"flores200": root / "flores200_dataset", "flores101": root / "flores101_dataset", "flat": root}[layout]
    for rel, text in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    return root


@pytest.mark.parametrize("layout", ["flores200", "flores101", "flat"])
@pytest.mark.parametrize("pair", ["fra_Latn-eng_Latn", "fra-eng", "fr-en"])
def test_flores_layouts_and_code_styles(tmp_path, layout, pair):
    root = _tree(tmp_path, layout)
    src, tgt = parse_pair(pair)
    rows = flores_bitext(root, src, tgt, "dev")
    assert [(r.id, r.source, r.target) for r in rows] == [("dev:1", "un", "one"), ("dev:2", "deux", "two")]


def test_flores_missing_language_and_file(tmp_path):
    root = _tree(tmp_path, "flores200")
    with pytest.raises(UserError, match="unknown language code 'xx'"):
        resolve_language("xx")
    with pytest.raises(UserError, match=r"FLORES dev file for German \(deu_Latn\) not found"):
        flores_bitext(root, resolve_language("de"), resolve_language("en"), "dev")
    with pytest.raises(UserError, match="devtest file"):
        flores_file(root, resolve_language("fr"), "devtest")
    with pytest.raises(UserError, match="language pair must look like"):
        parse_pair("french")


def test_real_flores_splits(data_dir):
    task = get_task("flores")
    data = load_data(task, TaskOptions(data_dir=str(data_dir), pair="fr-en"))
    assert len(data.bank) == 997 - 800 and data.bank[0].id == "dev:801" and data.bank[-1].id == "dev:997"
    assert len(data.test) == 1012 and (data.l1, data.l2) == ("French", "English")
    pt = load_data(task, TaskOptions(data_dir=str(data_dir), pair="eng-por"))
    assert pt.l2 == "Portuguese" and pt.test[0].source == data.test[0].target


def test_real_code_task(data_dir):
    data = load_data(get_task("humaneval"), TaskOptions(data_dir=str(data_dir)))
    assert len(data.bank) == 974 - 800 and data.bank[0].id == "mbpp:801"
    assert len(data.test) == 164 and set(data.problems) == {t.id for t in data.test}
    assert data.test[0].source.startswith("Check if in given list of numbers, are any two numbers closer")


def test_humaneval_query_extraction():
    assert humaneval_query('def f():\n    """ Do a thing.\n    >>> f()\n    """\n') == "Do a thing.\n    >>> f()"
    assert humaneval_query("def f():\n    '''single quotes'''\n") == "def f():\n    '''single quotes'''\n"


def test_build_items_and_bad_inputs(data_dir, bpe_tokenizer):
    task = get_task("flores")
    data = load_data(task, TaskOptions(data_dir=str(data_dir), pair="fra-eng"))
    items = build_items(task, data, bpe_tokenizer, k=5, seed=0, n_test=3)
    assert len(items) == 3 and all(it.encoded.example_ids == items[0].encoded.example_ids for it in items)
    per_query = build_items(task, data, bpe_tokenizer, k=5, seed=0, n_test=3, per_query_examples=True)
    assert per_query[0].encoded.example_ids != per_query[1].encoded.example_ids
    assert items[0].prompt.text.startswith("Translate French to English:\nQ:")
    with pytest.raises(UserError, match="prompt bank has only 197"):
        build_items(task, data, bpe_tokenizer, k=500, seed=0, n_test=1)
    with pytest.raises(UserError, match="--n-test"):
        build_items(task, data, bpe_tokenizer, k=1, seed=0, n_test=5000)


def test_bitext_task(tmp_path):
    bank = tmp_path / "bank.tsv"
    bank.write_text("chat\tcat\nchien\tdog\n")
    test = tmp_path / "test.jsonl"
    test.write_text('{"source": "oiseau", "target": "bird"}\n')
    data = load_data(get_task("bitext"), TaskOptions(bank_path=str(bank), test_path=str(test)))
    assert [e.source for e in data.bank] == ["chat", "chien"] and data.test[0].target == "bird"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_data(get_task("bitext"), TaskOptions(bank_path=str(bad), test_path=str(test)))


def test_registry_and_post_processing():
    assert set(TASKS) >= {"flores", "humaneval", "bitext"}
    with pytest.raises(UserError, match="unknown task"):
        get_task("nope")
    assert post_process(TASKS["flores"], " Hello world. \nQ:next") == "Hello world."
    assert post_process(TASKS["humaneval"], "def f():\n    return 1\n \nQ:Write") == "def f():\n    return 1"


def test_metrics():
    assert first_sentence("Hello there. And more.") == "Hello there."
    assert first_sentence("   ") == ""
    perfect = translation_scores(["The cat sat on the mat. Extra words here."], ["the cat sat on the mat."])
    assert perfect.bleu == pytest.approx(100.0) and perfect.hypotheses == ["The cat sat on the mat."]
    bad = translation_scores(["Completely unrelated output"], ["the cat sat on the mat."])
    assert bad.bleu < 10 and len(bad.sentence_bleu) == 1 and "case:lc" in bad.signature and "tok:13a" in bad.signature
    assert pass_at_1([True, False, True, True]) == 75.0
