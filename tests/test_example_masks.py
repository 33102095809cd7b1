"""Masks inside the examples: per-example spans, the "answers" / "inputs" / "example:i" conditions,
the "-below" window (``MaskBelow``), and the engines' exactness with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny
from icl_locate.cli import main
from icl_locate.core.conditions import MaskedPrompt, get_condition
from icl_locate.core.interventions import (
    UNCHANGED,
    HeadMask,
    MaskBelow,
    MaskFrom,
    PruneFrom,
    intervene,
    mask_row,
)
from icl_locate.core.prompts import (
    FORMATS,
    Example,
    PromptFormat,
    build_prompt,
    encode_prompt,
    render_answered,
    render_header,
)
from icl_locate.engines.base import StopRule, forward
from icl_locate.engines.paper import PaperEngine
from icl_locate.engines.pruned import prune_split
from icl_locate.engines.reference import ReferenceEngine, batch_interventions, greedy_decode
from icl_locate.engines.rows import plan_rows
from icl_locate.tasks.loaders import load_data
from icl_locate.tasks.spec import TaskOptions
from icl_locate.tasks.taskfile import load_task_file
from icl_locate.util.errors import UserError
from test_fast_engine import encoded_prompts
from test_tree_engine import assert_tree_equals

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MT = FORMATS["instr_machine_translation"]
SENTIMENT = PromptFormat(  # the prompt block of examples/sentiment/sentiment.yaml
    "sentiment", "Classify the sentiment of each sentence as positive or negative:", "Sentence:", "\nSentiment:"
)
MT_SHOTS = [
    Example("a", "Bonjour le monde.", "Hello world."),
    Example("b", " Merci beaucoup. ", "Thanks a lot."),
    Example("c", "Il pleut.", "It rains."),
]
SENTIMENT_SHOTS = [Example("p", "What a beautiful day.", "positive"), Example("n", "The kids were bored.", "negative")]
NEW_CONDITIONS = ("answers", "inputs", "example:2", "answers-below")


def ranges(enc, name: str) -> list[tuple[int, int]]:
    return list(MaskedPrompt.of(enc, get_condition(name)).hidden)


def decoded(tokenizer, enc, span) -> str:
    return tokenizer.decode(enc.ids[span[0] : span[1]])


# --------------------------------------------------------------------------- spans and ranges


@pytest.mark.parametrize("fmt", [MT, FORMATS["instr_code_gen"], FORMATS["instr_none_QA"], SENTIMENT])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_example_char_spans_hold_input_answer_and_example(fmt, k):
    prompt = build_prompt(fmt, MT_SHOTS[:k], "Il fait beau.")
    assert (
        prompt.text
        == f"{fmt.header}{fmt.sep}"
        + "".join(f"{render_answered(fmt, ex)}{fmt.example_suffix}{fmt.sep}" for ex in MT_SHOTS[:k])
        + f"{fmt.q}Il fait beau.{fmt.a}"
    )  # the text as it always was
    assert len(prompt.example_spans) == k
    for ex, spans in zip(MT_SHOTS, prompt.example_spans):
        assert prompt.text[slice(*spans["input"])] == ex.source.strip()
        assert prompt.text[slice(*spans["answer"])] == ex.target.strip()
        assert prompt.text[slice(*spans["example"])] == render_answered(fmt, ex) + fmt.example_suffix


def test_translation_prompt(bpe_tokenizer):
    """FLORES format: tokens 6-23 are 'Q' ':' 'B' 'on' 'j' 'our' ' le' ' monde' '.' 'A' ':' 'H' 'ell' 'o' ' world' '.'
    ' ' '\\n', then example 2 (24-44) and example 3 (45-59), the query from 60."""
    prompt = build_prompt(MT, MT_SHOTS, "Le chat.", header=render_header(MT, "French", "English"))
    enc = encode_prompt(bpe_tokenizer, prompt)
    assert enc.spans == {"bos": None, "instructions": (0, 5), "examples": (5, 60), "query": (60, 68)}
    assert ranges(enc, "answers") == [(17, 22), (36, 43), (54, 58)]
    assert ranges(enc, "inputs") == [(8, 15), (26, 34), (47, 52)]
    assert ranges(enc, "example:2") == [(24, 44)]
    assert ranges(enc, "answers-below") == [(17, 22), (36, 43), (54, 58)]
    assert [decoded(bpe_tokenizer, enc, r) for r in ranges(enc, "answers")] == [
        "Hello world.",
        "Thanks a lot.",
        "It rains.",
    ]
    assert decoded(bpe_tokenizer, enc, (24, 44)) == "Q:Merci beaucoup.A:Thanks a lot. "
    assert not enc.straddling


def test_two_label_classification_prompt(bpe_tokenizer):
    """The sentiment task's format: 'Sentence:' is tokens 23-26, the input 27-35, '\\n' 'S' 'ent' 'iment' ':' 36-40,
    'pos' 'it' 'ive' 41-43, ' ' 44, '\\n' 45; example 2 is 46-67 with 'ne' 'g' 'ative' at 64-66."""
    enc = encode_prompt(bpe_tokenizer, build_prompt(SENTIMENT, SENTIMENT_SHOTS, "I feel great."))
    assert ranges(enc, "answers") == [(41, 44), (64, 67)]
    assert ranges(enc, "inputs") == [(27, 36), (50, 59)]
    assert ranges(enc, "example:2") == [(46, 68)]
    assert ranges(enc, "answers-below") == [(41, 44), (64, 67)]
    assert [decoded(bpe_tokenizer, enc, r) for r in ranges(enc, "answers")] == ["positive", "negative"]
    assert decoded(bpe_tokenizer, enc, (46, 68)) == "Sentence:The kids were bored.\nSentiment:negative "


def test_task_file_with_jsonl_data(bpe_tokenizer):
    """examples/sentiment loaded from its task file and JSONL: bank items pos4 and neg17, test item neg4."""
    task = load_task_file(EXAMPLES / "sentiment" / "sentiment.yaml")
    data = load_data(task, TaskOptions())
    enc = encode_prompt(bpe_tokenizer, build_prompt(task.prompt_format, data.bank[:2], data.test[0].source))
    assert enc.example_ids == ["pos4", "neg17"]
    assert ranges(enc, "answers") == [(53, 56), (83, 86)]
    assert ranges(enc, "inputs") == [(27, 48), (62, 78)]
    assert ranges(enc, "example:2") == [(58, 87)]
    assert ranges(enc, "answers-below") == [(53, 56), (83, 86)]
    assert decoded(bpe_tokenizer, enc, (27, 48)) == "What a beautiful, sunny morning for a walk."
    assert decoded(bpe_tokenizer, enc, (62, 78)) == "The kids were bored by the puppet show."


def test_a_token_across_a_span_boundary_belongs_where_it_starts():
    """Whitespace words as tokens: 'Q:Bonjour' starts the example but crosses into the input, 'monde.A:Hello'
    starts in the input and crosses into the answer; both are straddling."""
    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    prompt = build_prompt(MT, MT_SHOTS[:1], "Il pleut.", header="Translate French to English:")
    enc = encode_prompt(tokenizer, prompt)
    # Translate French to English: | Q:Bonjour le monde.A:Hello world. | Q:Il pleut.A:
    #     0       1    2    3          4      5       6            7         8     9
    assert enc.example_spans == [{"input": (5, 7), "answer": (7, 8), "example": (4, 8)}]
    assert enc.straddling == [4, 6]
    assert ranges(enc, "answers") == [(7, 8)] and ranges(enc, "inputs") == [(5, 7)]


# --------------------------------------------------------------------------- condition names


def test_condition_names_and_windows():
    assert get_condition("answers").window == "from" and get_condition("answers").example_parts == {"answer"}
    below = get_condition("answers-below")
    assert (below.name, below.window, below.example_parts) == ("answers-below", "below", frozenset({"answer"}))
    assert get_condition("TTF-below").name == "instructions+examples-below"
    assert get_condition("example:12").example == 12 and get_condition("example:3-below").window == "below"
    for name in ("inputs", "example:2", "example:2-below", "instructions-below", "inputs-below"):
        assert get_condition(get_condition(name).name) == get_condition(name)  # names round-trip
    assert mask_row(get_condition("answers-below"), 3) == MaskBelow(3)
    assert mask_row(get_condition("answers"), 3) == MaskFrom(3) == mask_row(None, 3)


def test_conditions_command_lists_the_new_conditions(capsys):
    assert main(["conditions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("answers", "inputs", "example:<i>", "<condition>-below"):
        assert any(line.split()[0] == name and len(line.split()) > 2 for line in lines), name
    assert any(line.startswith("instructions+examples ") and " TTF " in line for line in lines)


@pytest.mark.parametrize(
    "name,message",
    [
        ("example:0", "numbered from 1"),
        ("example:x", "positive integer"),
        ("example:", "positive integer"),
        ("example:-1", "positive integer"),
        ("answers-below-below", "unknown condition"),
        ("query-below", "context only"),
        ("all-but-last-below", "context only"),
        ("TTT-below", "context only"),
        ("nope-below", "unknown condition"),
    ],
)
def test_bad_condition_names_are_one_user_error(name, message):
    with pytest.raises(UserError, match=message) as err:
        get_condition(name)
    assert "\n" not in str(err.value)


def test_example_beyond_the_prompt_is_one_user_error(bpe_tokenizer):
    enc = encode_prompt(bpe_tokenizer, build_prompt(SENTIMENT, SENTIMENT_SHOTS, "Fine."))
    assert ranges(enc, "example:1") and ranges(enc, "example:2")
    with pytest.raises(UserError, match="only 2 examples") as err:
        MaskedPrompt.of(enc, get_condition("example:3"))
    assert "\n" not in str(err.value)
    zero_shot = encode_prompt(bpe_tokenizer, build_prompt(SENTIMENT, [], "Fine."))
    with pytest.raises(UserError, match="no examples"):
        MaskedPrompt.of(zero_shot, get_condition("example:1-below"))


# --------------------------------------------------------------------------- rows


def test_rows_refuse_the_other_window():
    lm = tiny("llama")
    enc = encoded_prompts(lm.tokenizer)[0]
    below, above = MaskedPrompt.of(enc, get_condition("answers-below")), MaskedPrompt.of(enc, get_condition("answers"))
    n = lm.info.num_layers
    for row in (MaskFrom(1), PruneFrom(1), HeadMask(frozenset({(1, 0)}))):
        with pytest.raises(ValueError, match="masks below a layer"):
            plan_rows([below], [row], n)
    with pytest.raises(ValueError, match="masks from a layer on"):
        plan_rows([above], [MaskBelow(1)], n)
    with pytest.raises(UserError, match="below a layer only"):
        prune_split(MaskedPrompt.of(enc, get_condition("example:1-below")))
    with pytest.raises(ValueError, match="MaskFrom rows only"):
        PaperEngine(lm.model, lm.tokenizer).generate_ids([below], [MaskBelow(1)], 2)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="masks from a layer on"):
        PaperEngine(lm.model, lm.tokenizer).generate_ids([below], [MaskFrom(1)], 2)


def test_prefix_caches_are_shared_only_where_exact():
    """The unmasked prefix cache serves a row only under a layer-from mask with no visible context after
    hidden context; MaskBelow rows that hide context, and interleaved conditions, get their own."""
    lm = tiny("llama")
    n = lm.info.num_layers
    enc = encoded_prompts(lm.tokenizer)[0]

    def own(condition: str, row) -> bool:
        return plan_rows([MaskedPrompt.of(enc, get_condition(condition))], [row], n)[0].prefix_key[1] is not None

    assert [own("examples-below", MaskBelow(j)) for j in range(n + 1)] == [False] + [True] * (n - 1) + [False]
    assert [own("answers", MaskFrom(j)) for j in range(n + 1)] == [True] * n + [False]
    assert not any(own("examples", MaskFrom(j)) for j in range(n + 1))


# --------------------------------------------------------------------------- engines


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
@pytest.mark.parametrize("condition", ["answers-below", "inputs-below", "examples-below"])
def test_mask_below_on_fast_and_tree_engines(family, condition):
    """Every j in 0..L, queries of different lengths and contexts (left padding): tree = fast = reference."""
    lm = tiny(family)
    rows = [MaskBelow(j) for j in range(lm.info.num_layers + 1)] + [UNCHANGED]
    assert_tree_equals(lm, encoded_prompts(lm.tokenizer, shared=False), get_condition(condition), rows)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
@pytest.mark.parametrize("condition", ["answers", "inputs", "example:2"])
def test_masks_inside_the_examples_from_a_layer(family, condition):
    lm = tiny(family)
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    assert_tree_equals(lm, encoded_prompts(lm.tokenizer), get_condition(condition), rows)


def converse_by_hand(model, ids: torch.Tensor, hidden: list[tuple[int, int]], below: int) -> torch.Tensor:
    """The converse window written out with the official attention_mask argument of an eager llama: at
    layers < ``below`` a position outside ``hidden`` may not attend to a hidden column; hidden positions
    and every other layer keep the causal mask. Last-position logits."""
    n = ids.shape[1]
    is_hidden = torch.zeros(n, dtype=torch.bool)
    for a, b in hidden:
        is_hidden[a:b] = True
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    masked = causal & ~(is_hidden[None, :] & ~is_hidden[:, None])  # [q, kv]
    handles = []
    for idx, layer in enumerate(model.model.layers):
        allowed = masked if idx < below else causal
        additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]

        def hook(module, args, kwargs, additive=additive):
            return args, {**kwargs, "attention_mask": additive}

        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return model(ids).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()


def test_mask_below_hides_the_columns_from_the_other_positions_below_j():
    """MaskBelow(j) equals the converse mask written out by hand (eager llama); the first hidden tokens'
    own states are the unmasked ones (they attend as usual); MaskBelow(L) is MaskFrom(0) at the last
    position and MaskBelow(0) is no mask."""
    lm = tiny("llama", "eager")
    n = lm.info.num_layers
    enc = encoded_prompts(lm.tokenizer)[0]
    below, above = MaskedPrompt.of(enc, get_condition("answers-below")), MaskedPrompt.of(enc, get_condition("answers"))
    ids = torch.tensor([enc.ids])

    def logits(prompt, row) -> torch.Tensor:
        return forward(lm.model, ids, interventions=batch_interventions(prompt, row, n), last_only=True).logits

    plain = forward(lm.model, ids, last_only=True).logits
    assert torch.allclose(logits(below, MaskBelow(n)), logits(above, MaskFrom(0)), atol=1e-6)
    assert torch.equal(logits(below, MaskBelow(0)), plain)
    first = below.hidden[0]
    for j in range(1, n + 1):
        by_hand = converse_by_hand(lm.model, ids, list(below.hidden), j)
        assert torch.allclose(logits(below, MaskBelow(j))[:, -1], by_hand, atol=1e-5)
        assert not torch.allclose(by_hand, plain[:, -1], atol=1e-5)
        with intervene(lm.model, *batch_interventions(below, MaskBelow(j), n)):
            states = lm.model(ids, output_hidden_states=True).hidden_states
        unmasked = lm.model(ids, output_hidden_states=True).hidden_states
        for layer in range(n + 1):  # nothing before the first hidden tokens reads a hidden column
            assert torch.allclose(states[layer][0, : first[1]], unmasked[layer][0, : first[1]], atol=1e-6)
    stop = StopRule((), 6)
    engine = ReferenceEngine(lm.model, lm.tokenizer)
    tokens = engine.generate([below], [MaskBelow(n), MaskBelow(0)], stop)
    assert (
        tokens[(0, MaskBelow(n))].token_ids == engine.generate([above], [MaskFrom(0)], stop)[(0, MaskFrom(0))].token_ids
    )
    assert tokens[(0, MaskBelow(0))].token_ids == greedy_decode(lm.model, lm.tokenizer, enc.ids, (), stop).token_ids


# --------------------------------------------------------------------------- sweeps, analysis and refusals


def test_converse_curve_is_read_from_its_unmasked_end():
    """A '-below' curve has nothing hidden at j = 0: its baseline is there, and the layer it points to is
    the last j up to which hiding the columns below j keeps the score (here 3: 0.9 >= 0.95 x 0.9 until j = 3)."""
    from icl_locate.results.analysis import analyse_curve, savings, unharmed_until
    from test_task_files import curve_from

    assert unharmed_until([0, 1, 2, 3, 4], [0.9, 0.9, 0.88, 0.86, 0.1], 0.9) == 3
    assert unharmed_until([0, 1, 2], [0.9, 0.1, 0.9], 0.9) == 0
    curve = curve_from([0.9, 0.9, 0.88, 0.86, 0.1, 0.1])
    curve.key["condition"] = "answers-below"
    c = analyse_curve(curve, n_boot=300)
    assert c.converse and c.baseline == pytest.approx(90.0) and c.recognition == 3
    assert c.verdict.startswith("unharmed if hidden below layers <= 3") and savings(c, 5) is None
    flat = curve_from([0.5] * 5)
    flat.key["condition"] = "answers-below"
    assert analyse_curve(flat, n_boot=300).verdict.startswith("no layer: nothing hidden")


def test_sweep_of_masks_inside_the_examples_stores_and_reports(tmp_path, capsys):
    import sqlite3

    from icl_locate.cli import main

    store = tmp_path / "s.sqlite"
    argv = ["sweep", "--model", "tiny:gemma3", "--task", str(EXAMPLES / "sentiment" / "sentiment.yaml")]
    argv += ["--conditions", "answers,answers-below,example:2", "--ks", "2", "--n-test", "3", "--layers", "0,2,4"]
    argv += ["--audit", "1", "--store", str(store)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sweep finished: 3 units run" in out and "ENGINE FAULT" not in out
    db = sqlite3.connect(store)
    hidden = dict(
        db.execute(
            "SELECT json_extract(u.spec, '$.condition') || '@' || p.layer, p.hidden_ranges FROM predictions p "
            "JOIN units u USING (unit_id) WHERE p.item = 0"
        ).fetchall()
    )
    agree = [a for (a,) in db.execute("SELECT agree FROM audits")]
    db.close()
    assert hidden["answers@4"] == "[]" and hidden["answers@0"] != "[]"  # from j = L nothing is hidden
    assert hidden["answers-below@0"] == "[]" and hidden["answers-below@4"] == hidden["answers@0"]
    assert agree and all(agree)
    assert main(["report", str(store), "--out-dir", str(tmp_path / "rep"), "--format", "md", "--bootstrap", "20"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "answers-below (instr, k=2)" in text and "example:2 (instr, k=2)" in text


def test_commands_that_mask_from_a_layer_refuse_a_converse_window(capsys):
    from icl_locate.cli import main

    sentiment = str(EXAMPLES / "sentiment" / "sentiment.yaml")
    for argv in (
        ["sweep", "--store", "x.sqlite", "--task", sentiment, "--conditions", "answers-below", "--heads", "knockout"],
        ["bench", "--model", "tiny:llama", "--condition", "examples-below", "--n-test", "1"],
        ["prune", "--model", "tiny:llama", "--condition", "examples-below", "--layer", "2", "--n-test", "1"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "below" in err, argv
