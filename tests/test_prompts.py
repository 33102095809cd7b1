"""Prompt formats (golden strings from the paper's configs) and token spans."""

from __future__ import annotations

import pytest

from icl_locate.core.prompts import FORMATS, Example, build_prompt, encode_prompt, render_header, sample_examples
from icl_locate.util.errors import UserError

SHOTS = [Example("a", "Bonjour le monde.", "Hello world."), Example("b", " Merci beaucoup. ", "Thanks a lot.")]
MT = FORMATS["instr_machine_translation"]
CODE = FORMATS["instr_code_gen"]
NONE = FORMATS["instr_none_QA"]

GOLDEN = [
    # (format, header, k, expected prompt)
    (
        MT,
        render_header(MT, "French", "English"),
        2,
        "Translate French to English:\nQ:Bonjour le monde.A:Hello world. \nQ:Merci beaucoup.A:Thanks a lot. \n"
        "Q:Il pleut.A:",
    ),
    (
        MT,
        render_header(MT, "English", "French"),
        1,
        "Translate English to French:\nQ:Bonjour le monde.A:Hello world. \nQ:Il pleut.A:",
    ),
    (MT, render_header(MT, "French", "English"), 0, "Translate French to English:\nQ:Il pleut.A:"),
    (MT, "", 1, "\nQ:Bonjour le monde.A:Hello world. \nQ:Il pleut.A:"),  # the no-instructions variant
    (
        CODE,
        CODE.header,
        2,
        "Write a program for the following task:\n\nQ:Bonjour le monde.\nA:Hello world. \nQ:Merci beaucoup.\n"
        "A:Thanks a lot. \nQ:Il pleut.\nA:",
    ),
    (CODE, CODE.header, 0, "Write a program for the following task:\n\nQ:Il pleut.\nA:"),
    (
        NONE,
        NONE.header,
        2,
        "\nQ:Bonjour le monde.\nA:Hello world. \nQ:Merci beaucoup.\nA:Thanks a lot. \nQ:Il pleut.\nA:",
    ),
]


@pytest.mark.parametrize("fmt,header,k,expected", GOLDEN)
def test_golden_prompt_strings(fmt, header, k, expected):
    prompt = build_prompt(fmt, SHOTS[:k], "Il pleut.", header=header)
    assert prompt.text == expected
    spans = prompt.char_spans
    text = prompt.text
    if header:
        assert text[slice(*spans["instructions"])] == header
    else:
        assert spans["instructions"] is None
    assert text[slice(*spans["query"])] == f"{fmt.q}Il pleut.{fmt.a}"
    examples = text[slice(*spans["examples"])]
    if k:
        assert examples.startswith(fmt.sep + fmt.q) and examples.endswith(" " + fmt.sep)
    else:
        assert examples == fmt.sep  # the paper's code masks the lone separator too


def test_sampling_is_seeded_and_recorded():
    bank = [Example(str(i), f"s{i}", f"t{i}") for i in range(50)]
    a, b, c = sample_examples(bank, 5, 0), sample_examples(bank, 5, 0), sample_examples(bank, 5, 1)
    assert [e.id for e in a] == [e.id for e in b] and [e.id for e in a] != [e.id for e in c]
    assert len({e.id for e in a}) == 5
    assert build_prompt(MT, a, "q").example_ids == [e.id for e in a]
    with pytest.raises(UserError, match="prompt bank has only 50"):
        sample_examples(bank, 51, 0)


def _check_spans(tokenizer, fmt, header, k):
    prompt = build_prompt(fmt, SHOTS[:k], "Il pleut.", header=header)
    enc = encode_prompt(tokenizer, prompt)
    assert enc.ids == tokenizer(prompt.text)["input_ids"]
    for part in ("instructions", "examples", "query"):
        char_span = prompt.char_spans[part]
        if char_span is None:
            assert enc.spans[part] is None
            continue
        if enc.straddling:  # a token crossing a boundary belongs to the part where it starts
            if enc.spans[part] is None:  # e.g. k = 0: the lone separator merged into the header's last token
                continue
            a, b = enc.spans[part]
            expected = prompt.text[enc.offsets[a][0] : enc.offsets[b - 1][1]]
            assert abs(len(expected) - (char_span[1] - char_span[0])) <= 2
        else:
            expected = prompt.text[slice(*char_span)]
        assert enc.span_text(tokenizer, part) == expected, part
    # spans tile the prompt after BOS, in order
    covered = [enc.spans[p] for p in ("bos", "instructions", "examples", "query") if enc.spans[p]]
    assert enc.spans["query"] is not None
    assert covered[0][0] == 0 and covered[-1][1] == len(enc.ids)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert "".join(enc.span_text(tokenizer, p) for p in ("instructions", "examples", "query")) == prompt.text
    return enc


@pytest.mark.parametrize("fmt,header,k,expected", GOLDEN)
def test_spans_round_trip_gpt2_style_bpe(bpe_tokenizer, fmt, header, k, expected):
    enc = _check_spans(bpe_tokenizer, fmt, header, k)
    assert enc.spans["bos"] is None  # GPT-2-style tokenizers add no BOS


@pytest.mark.slow
@pytest.mark.parametrize("fmt,header,k,expected", GOLDEN)
def test_spans_round_trip_gemma(gemma, fmt, header, k, expected):
    enc = _check_spans(gemma.tokenizer, fmt, header, k)
    if fmt is MT:  # ":" and "\n" are separate tokens: the MT parts decode back exactly
        assert not enc.straddling
    assert enc.spans["bos"] == (0, 1) and gemma.tokenizer.decode(enc.ids[:1]) == "<bos>"
