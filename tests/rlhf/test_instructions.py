"""GAtt instructions: each checkable rule on hand-written answers, the sampler, JSON."""

from __future__ import annotations

import random

import pytest

from llama_dist.rlhf.instructions import (
    CATEGORIES,
    CapitalLetters,
    EndWith,
    Instruction,
    MaxWords,
    NoLetter,
    StartWith,
    Trait,
    constraint_pool,
    instruction_from_json,
    sample_instruction,
)


@pytest.mark.parametrize(
    ("rule", "good", "bad"),
    [
        (CapitalLetters(), ["THE CAT SAT.", "OK, 42 TIMES!"], ["The cat sat.", "42", ""]),
        (NoLetter("e"), ["a cat sat on a mat", "Big dog!"], ["the cat", "EVERY dog", ""]),
        (
            StartWith("okay"),
            ["okay the cat", "Okay, then.", "OKAY!"],
            ["the cat okay", "okayish", ""],
        ),
        (EndWith("ciao"), ["the cat ciao", "so long, Ciao!"], ["ciao the cat", "ciaos", ""]),
        (MaxWords(3), ["one", "one two three"], ["one two three four", "", "   "]),
    ],
)
def test_each_check_on_hand_written_answers(rule, good, bad):
    for answer in good:
        assert rule.check(answer), answer
    for answer in bad:
        assert not rule.check(answer), answer
    # What the rule-based responders rely on: apply makes an answer conform.
    assert rule.check(rule.apply("the big red dog ran to the sun"))


def test_rule_texts_and_short_forms():
    assert EndWith("ciao").text == 'End every answer with the word "ciao".'
    assert EndWith("ciao").short == 'End with "ciao".'
    assert Trait("persona", "Napoleon").text == "Always act as Napoleon from now on."
    assert Trait("persona", "Napoleon").short == "Figure: Napoleon."
    for constraints in constraint_pool().values():
        for c in constraints:
            assert c.short != c.text and len(c.short) < len(c.text)


def test_combined_instruction_text_checks_and_apply():
    instruction = Instruction(
        (Trait("persona", "a pirate"), StartWith("so"), MaxWords(5), CapitalLetters()),
        shortened=(True, False, True, False),
    )
    assert instruction.text == (
        'Figure: a pirate. Start every answer with the word "so". Max 5 words. '
        "Answer only in capital letters."
    )
    assert instruction.full_text.startswith("Always act as a pirate from now on. Start every")
    assert [r.name for r in instruction.checks] == ["start_with", "max_words", "capital_letters"]
    assert instruction.kind == "start_with+max_words+capital_letters"
    assert instruction.check("SO I SAIL")
    assert not instruction.check("SO I SAIL THE SEVEN SEAS")  # six words
    assert not instruction.check("so i sail")
    applied = instruction.apply("the big red dog ran to the sun")
    assert instruction.check(applied), applied
    assert instruction_from_json(instruction.to_json()) == instruction
    with pytest.raises(ValueError, match="at most one per category"):
        Instruction((EndWith("ciao"), EndWith("amigo")))


def test_sampler_is_reproducible_and_shortens_about_half():
    draws = [sample_instruction(random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    instructions = [sample_instruction(rng, max_constraints=3) for _ in range(400)]
    assert len({i.text for i in instructions}) > 200  # not one instruction over and over
    flags = [s for i in instructions for s in i.shortened]
    assert 0.45 < sum(flags) / len(flags) < 0.55
    sizes = {len(i.constraints) for i in instructions}
    assert sizes == {1, 2, 3}
    for i in instructions:
        categories = [c.category for c in i.constraints]
        assert len(set(categories)) == len(categories)
        assert categories == sorted(categories, key=CATEGORIES.index)
        assert instruction_from_json(i.to_json()) == i
    # Traits only happen without require_check; with it every instruction has a check.
    assert any(not i.checks for i in instructions)
    rng = random.Random(1)
    assert all(sample_instruction(rng, require_check=True).checks for _ in range(200))
    never = [sample_instruction(random.Random(s), short_prob=0.0) for s in range(20)]
    assert all(i.text == i.full_text for i in never)
