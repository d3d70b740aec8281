"""System instructions for Ghost Attention, combined at random from constraint lists
(llama2.md, "Ghost Attention, GAtt"; the paper's section 3.3 and A.3.5).

A constraint belongs to one category. Four categories are traits no program can verify
(persona "act as ...", language, hobby, style); five are checkable rules, each a frozen
dataclass with `text` (the full instruction), `short` (the shortened form the paper uses for
half of them, "Always act as Napoleon from now" -> "Figure: Napoleon") and
`check(answer) -> bool`:

    case     CapitalLetters   answer only in capital letters
    letters  NoLetter(e)      never use the letter e
    opening  StartWith(w)     start every answer with the word w
    closing  EndWith(w)       end every answer with the word w
    length   MaxWords(n)      answer in at most n words

`sample_instruction(rng)` draws 1..k constraints, at most one per category (so two rules
never contradict each other), optionally at least one checkable, and shortens each with
probability 0.5. The `Instruction` it returns says which checks apply (`checks`, `check`) and
serialises to JSON (`to_json`, `instruction_from_json`), which is how GAtt data records carry
it (`data.gatt`). A GAtt stage calls `sample_instruction` once per dialog with a seeded
`random.Random`; the adherence evaluation (`rlhf.gatt_eval`) calls `Instruction.check` on
each answer.

Every rule also has `apply(answer)`, which makes an answer conform; the rule-based responders
of the tests and the synthetic task use it (they play the model that follows instructions).
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The lists ----------------------------------------------------------------------------------
# Traits no program checks: category -> (values, full template, short template).
TRAITS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "persona": (
        ("Napoleon", "a pirate", "Sherlock Holmes", "a medieval knight", "Ada Lovelace"),
        "Always act as {} from now on.",
        "Figure: {}.",
    ),
    "language": (
        ("French", "Spanish", "German", "Italian"),
        "Always answer in {}.",
        "Language: {}.",
    ),
    "hobby": (
        ("tennis", "chess", "gardening", "astronomy"),
        "You love {} and bring it up whenever you can.",
        "Hobby: {}.",
    ),
    "style": (
        ("formal", "casual", "poetic", "cheerful"),
        "Always answer in a {} style.",
        "Style: {}.",
    ),
}
# Words of the opening and closing rules: none holds an "e", so either rule combines with
# "never use the letter e".
START_WORDS = ("okay", "so", "right", "look")
END_WORDS = ("thanks", "ciao", "aloha", "amigo")
MAX_WORDS = (5, 8, 12)
FORBIDDEN_LETTERS = ("e",)

TRAIT_CATEGORIES = tuple(TRAITS)
RULE_CATEGORIES = ("case", "letters", "opening", "closing", "length")
CATEGORIES = TRAIT_CATEGORIES + RULE_CATEGORIES
# The order rules are applied in by `Instruction.apply`: words added first, the length cut
# keeps the first and last word, letter-level rules last.
_APPLY_ORDER = ("opening", "closing", "length", "letters", "case")
_PUNCTUATION = string.punctuation + "\u2019\u201c\u201d"


def _words(answer: str) -> list[str]:
    return answer.split()


def _bare(word: str) -> str:
    return word.strip(_PUNCTUATION).lower()


# The constraints ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trait:
    """A constraint no program verifies: a persona, a language, a hobby or a style."""

    category: str
    value: str
    checkable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.category not in TRAITS:
            raise ValueError(f"trait category {self.category!r} is not one of {TRAIT_CATEGORIES}")

    @property
    def name(self) -> str:
        return self.category

    @property
    def text(self) -> str:
        return TRAITS[self.category][1].format(self.value)

    @property
    def short(self) -> str:
        return TRAITS[self.category][2].format(self.value)

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "value": self.value}


@dataclass(frozen=True)
class CapitalLetters:
    """Every letter of the answer is a capital (and it has at least one letter)."""

    category: ClassVar[str] = "case"
    name: ClassVar[str] = "capital_letters"
    checkable: ClassVar[bool] = True

    @property
    def text(self) -> str:
        return "Answer only in capital letters."

    @property
    def short(self) -> str:
        return "Capitals only."

    def check(self, answer: str) -> bool:
        return any(c.isalpha() for c in answer) and answer == answer.upper()

    def apply(self, answer: str) -> str:
        return answer.upper()

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category}


@dataclass(frozen=True)
class NoLetter:
    """The answer never uses `letter` (in either case); an empty answer does not count."""

    letter: str = "e"
    category: ClassVar[str] = "letters"
    checkable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if len(self.letter) != 1 or not self.letter.isalpha():
            raise ValueError(f"NoLetter letter={self.letter!r} must be one letter")

    @property
    def name(self) -> str:
        return f"no_letter_{self.letter.lower()}"

    @property
    def text(self) -> str:
        return f'Never use the letter "{self.letter}" in your answers.'

    @property
    def short(self) -> str:
        return f'No letter "{self.letter}".'

    def check(self, answer: str) -> bool:
        return bool(answer.strip()) and self.letter.lower() not in answer.lower()

    def apply(self, answer: str) -> str:
        kept = (
            w.replace(self.letter.lower(), "").replace(self.letter.upper(), "")
            for w in _words(answer)
        )
        return " ".join(w for w in kept if w)

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "letter": self.letter}


@dataclass(frozen=True)
class StartWith:
    """The answer's first word is `word` (punctuation and case aside)."""

    word: str
    category: ClassVar[str] = "opening"
    name: ClassVar[str] = "start_with"
    checkable: ClassVar[bool] = True

    @property
    def text(self) -> str:
        return f'Start every answer with the word "{self.word}".'

    @property
    def short(self) -> str:
        return f'Start with "{self.word}".'

    def check(self, answer: str) -> bool:
        words = _words(answer)
        return bool(words) and _bare(words[0]) == self.word.lower()

    def apply(self, answer: str) -> str:
        return answer if self.check(answer) else " ".join([self.word, *_words(answer)])

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "word": self.word}


@dataclass(frozen=True)
class EndWith:
    """The answer's last word is `word` (punctuation and case aside)."""

    word: str
    category: ClassVar[str] = "closing"
    name: ClassVar[str] = "end_with"
    checkable: ClassVar[bool] = True

    @property
    def text(self) -> str:
        return f'End every answer with the word "{self.word}".'

    @property
    def short(self) -> str:
        return f'End with "{self.word}".'

    def check(self, answer: str) -> bool:
        words = _words(answer)
        return bool(words) and _bare(words[-1]) == self.word.lower()

    def apply(self, answer: str) -> str:
        return answer if self.check(answer) else " ".join([*_words(answer), self.word])

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "word": self.word}


@dataclass(frozen=True)
class MaxWords:
    """The answer has 1..n words (split at whitespace)."""

    n: int
    category: ClassVar[str] = "length"
    name: ClassVar[str] = "max_words"
    checkable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"MaxWords n={self.n!r} must be an integer >= 2")

    @property
    def text(self) -> str:
        return f"Answer in at most {self.n} words."

    @property
    def short(self) -> str:
        return f"Max {self.n} words."

    def check(self, answer: str) -> bool:
        return 1 <= len(_words(answer)) <= self.n

    def apply(self, answer: str) -> str:
        words = _words(answer)
        if len(words) <= self.n:
            return answer
        # The last word stays, so that a closing rule applied before still holds.
        return " ".join([*words[: self.n - 1], words[-1]])

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "n": self.n}


Rule = CapitalLetters | NoLetter | StartWith | EndWith | MaxWords
Constraint = Trait | Rule
_RULE_CLASSES: dict[str, type] = {
    "case": CapitalLetters,
    "letters": NoLetter,
    "opening": StartWith,
    "closing": EndWith,
    "length": MaxWords,
}


def apply_rules(rules: Sequence[Rule], answer: str) -> str:
    """`answer` made to follow `rules` (one per category), applied in `_APPLY_ORDER`."""
    for rule in sorted(rules, key=lambda r: _APPLY_ORDER.index(r.category)):
        answer = rule.apply(answer)
    return answer


def constraint_from_json(data: Mapping[str, Any]) -> Constraint:
    """The constraint `to_json` wrote."""
    params = dict(data)
    category = params.pop("category", None)
    if category in TRAITS:
        return Trait(category, **params)
    if category in _RULE_CLASSES:
        return _RULE_CLASSES[category](**params)
    raise ValueError(f"constraint category {category!r} is not one of {CATEGORIES}")


def constraint_pool() -> dict[str, list[Constraint]]:
    """category -> every constraint of the lists above."""
    pool: dict[str, list[Constraint]] = {
        category: [Trait(category, value) for value in values]
        for category, (values, _, _) in TRAITS.items()
    }
    pool["case"] = [CapitalLetters()]
    pool["letters"] = [NoLetter(letter) for letter in FORBIDDEN_LETTERS]
    pool["opening"] = [StartWith(w) for w in START_WORDS]
    pool["closing"] = [EndWith(w) for w in END_WORDS]
    pool["length"] = [MaxWords(n) for n in MAX_WORDS]
    return pool


# Instructions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    """Constraints combined into one system instruction, each said in full or shortened."""

    constraints: tuple[Constraint, ...]
    shortened: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.constraints:
            raise ValueError("an instruction needs at least one constraint")
        if not self.shortened:
            object.__setattr__(self, "shortened", (False,) * len(self.constraints))
        if len(self.shortened) != len(self.constraints):
            raise ValueError(
                f"{len(self.shortened)} shortened flags for {len(self.constraints)} constraints; "
                "give one per constraint"
            )
        categories = [c.category for c in self.constraints]
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories {categories} repeat; use at most one per category")

    @property
    def text(self) -> str:
        """The instruction as the training sample's system message says it."""
        return " ".join(
            c.short if s else c.text for c, s in zip(self.constraints, self.shortened, strict=True)
        )

    @property
    def full_text(self) -> str:
        """The instruction with nothing shortened (what sampling concatenates to user turns)."""
        return " ".join(c.text for c in self.constraints)

    @property
    def checks(self) -> tuple[Rule, ...]:
        return tuple(c for c in self.constraints if c.checkable)

    @property
    def kind(self) -> str:
        """Its checks' names joined by "+" (the row of the adherence table); "unchecked" for
        an instruction of traits only."""
        return "+".join(r.name for r in self.checks) or "unchecked"

    def check(self, answer: str) -> bool:
        """Whether `answer` passes every check (true when there are none)."""
        return all(r.check(answer) for r in self.checks)

    def apply(self, answer: str) -> str:
        """`answer` made to pass every check."""
        return apply_rules(self.checks, answer)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "constraints": [c.to_json() for c in self.constraints],
            "shortened": list(self.shortened),
        }


def instruction_from_json(data: Mapping[str, Any]) -> Instruction:
    """The instruction `Instruction.to_json` wrote (its "text" is derived, not read)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("constraints"), list):
        raise ValueError(f"an instruction record needs a 'constraints' list, got {data!r}")
    constraints = tuple(constraint_from_json(c) for c in data["constraints"])
    shortened = tuple(bool(s) for s in data.get("shortened") or ())
    return Instruction(constraints, shortened)


def sample_instruction(
    rng: random.Random,
    *,
    max_constraints: int = 3,
    require_check: bool = False,
    short_prob: float = 0.5,
    pool: Mapping[str, Sequence[Constraint]] | None = None,
) -> Instruction:
    """An instruction of 1..max_constraints constraints drawn from `pool` (default
    `constraint_pool()`), at most one per category, listed in the pool's category order;
    with `require_check` at least one is a checkable rule. Each is shortened with
    probability `short_prob`. Reproducible for a seeded `rng`."""
    pool = constraint_pool() if pool is None else pool
    categories = [c for c in pool if pool[c]]
    if max_constraints < 1:
        raise ValueError(f"max_constraints={max_constraints} must be >= 1")
    if not 0.0 <= short_prob <= 1.0:
        raise ValueError(f"short_prob={short_prob} must be in [0, 1]")
    checkable = [c for c in categories if pool[c][0].checkable]
    if require_check and not checkable:
        raise ValueError("require_check=True but the pool has no checkable rule")
    count = rng.randint(1, min(max_constraints, len(categories)))
    chosen: list[str] = []
    if require_check:
        chosen.append(rng.choice(checkable))
    rest = [c for c in categories if c not in chosen]
    chosen += rng.sample(rest, count - len(chosen))
    chosen.sort(key=categories.index)
    constraints = tuple(rng.choice(list(pool[c])) for c in chosen)
    shortened = tuple(rng.random() < short_prob for _ in constraints)
    return Instruction(constraints, shortened)


def known_rules(pool: Mapping[str, Sequence[Constraint]] | None = None) -> list[Rule]:
    """Every checkable rule of `pool` (default `constraint_pool()`)."""
    pool = constraint_pool() if pool is None else pool
    return [c for constraints in pool.values() for c in constraints if c.checkable]
