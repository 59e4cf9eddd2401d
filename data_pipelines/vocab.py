"""Concept vocabularies: phrases, synonyms, is-a parents and look-alike hard negatives.

A vocabulary file (``configs/agriculture/vocab/*.txt``) holds one concept per line::

    # comments start with '#', blank lines are ignored
    apple
    ripe apple | red apple | mature apple < apple ! unripe apple, tomato
    unripe apple | green apple < apple ! ripe apple, leaf

    phrase [| synonym ...] [< parent, ...] [! look-alike, ...]

* The first phrase is the concept's canonical phrase; phrases after ``|`` are synonyms: prompts
  that mean the same, mapped back to the canonical phrase (a teacher asked "red apple" labels
  "ripe apple"). Every phrase and synonym is defined once in a vocabulary.
* ``<`` names the concepts it is a kind of: a "ripe apple" is an "apple", so an image showing
  ripe apples never gets "apple" as a negative phrase. Parents must be concepts of the vocabulary
  (defined anywhere in the loaded files) and must not form cycles.
* ``!`` names look-alikes that are NOT this concept (crop vs weed, ripe vs unripe): hard negative
  phrases. The relation is symmetric. A look-alike may be a concept of the vocabulary or any other
  phrase ("water droplet" for "leaf spot"); it may not be the concept's own parent or child.

Phrases are normalised like everywhere else (:func:`data_pipelines.schema.normalize_phrase`). A plain
list with one phrase per line is a valid vocabulary. Errors name the file and line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.schema import normalize_phrase


class VocabularyError(ValueError):
    """A malformed or contradictory vocabulary; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Concept:
    """One concept of a vocabulary.

    Attributes:
        phrase: the canonical phrase.
        synonyms: other phrases for the same concept.
        parents: canonical phrases of the concepts it is a kind of.
        lookalikes: hard-negative phrases as written on its line (canonicalised where they are concepts).
        where: ``file:line`` that defined it.
    """

    phrase: str
    synonyms: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    lookalikes: tuple[str, ...] = ()
    where: str = ""


@dataclass(frozen=True)
class Vocabulary:
    """Concepts in file order with lookups; build with :func:`load_vocabulary` or :func:`parse_vocabulary`."""

    concepts: tuple[Concept, ...]
    _canonical: dict[str, str] = field(default_factory=dict, repr=False)
    _by_phrase: dict[str, Concept] = field(default_factory=dict, repr=False)

    @property
    def phrases(self) -> list[str]:
        """Canonical phrases in file order (what to ask a teacher, what to train on)."""
        return [c.phrase for c in self.concepts]

    @property
    def synonyms(self) -> dict[str, str]:
        """Every phrase of the vocabulary (canonical ones included) -> its canonical phrase."""
        return dict(self._canonical)

    @property
    def hard_negative_pairs(self) -> list[tuple[str, str]]:
        """(concept, look-alike) pairs as written, look-alikes canonicalised where they are concepts."""
        return [(c.phrase, other) for c in self.concepts for other in c.lookalikes]

    def __contains__(self, phrase: str) -> bool:
        return normalize_phrase(phrase) in self._canonical

    def __len__(self) -> int:
        return len(self.concepts)

    def canonical(self, phrase: str) -> str:
        """The canonical phrase of ``phrase`` or one of its synonyms; KeyError for unknown phrases."""
        key = normalize_phrase(phrase)
        if key not in self._canonical:
            raise KeyError(f"{phrase!r} is not in the vocabulary ({len(self.concepts)} concepts)")
        return self._canonical[key]

    def concept(self, phrase: str) -> Concept:
        """The concept of a phrase or synonym."""
        return self._by_phrase[self.canonical(phrase)]

    def prompts(self, phrase: str) -> tuple[str, ...]:
        """Canonical phrase then synonyms: every wording to ask a teacher for this concept."""
        concept = self.concept(phrase)
        return (concept.phrase, *concept.synonyms)

    def ancestors(self, phrase: str) -> set[str]:
        """Canonical phrases of every concept ``phrase`` is a kind of, transitively."""
        found: set[str] = set()
        stack = list(self.concept(phrase).parents)
        while stack:
            parent = stack.pop()
            if parent not in found:
                found.add(parent)
                stack.extend(self._by_phrase[parent].parents)
        return found

    def descendants(self, phrase: str) -> set[str]:
        """Canonical phrases of every concept that is a kind of ``phrase``, transitively."""
        target = self.canonical(phrase)
        return {c.phrase for c in self.concepts if target in self.ancestors(c.phrase)}

    def hard_negatives(self, phrase: str) -> list[str]:
        """Look-alikes of a concept, in both directions of the relation, in file order."""
        target = self.canonical(phrase)
        found = [other for concept, other in self.hard_negative_pairs if concept == target]
        found += [concept for concept, other in self.hard_negative_pairs if other == target]
        return list(dict.fromkeys(found))

    def implied(self, phrases: Iterable[str]) -> set[str]:
        """Phrases that may be present when ``phrases`` are: them, their ancestors and descendants.

        Phrases outside the vocabulary are returned normalised, as they are.
        """
        out: set[str] = set()
        for phrase in phrases:
            if phrase in self:
                canonical = self.canonical(phrase)
                out |= {canonical} | self.ancestors(canonical) | self.descendants(canonical)
            else:
                out.add(normalize_phrase(phrase))
        return out

    def hard_negative_candidates(self, positives: Iterable[str]) -> list[str]:
        """Look-alikes of the positive phrases of an image, minus anything those phrases imply.

        Only candidates: a look-alike is a true negative only where the image is labelled for it
        (an exhaustive query of that phrase without instances, or labels covering the vocabulary).
        """
        positives = list(positives)
        excluded = self.implied(positives)
        found = [other for p in positives if p in self for other in self.hard_negatives(p)]
        return [p for p in dict.fromkeys(found) if p not in excluded]


def parse_vocabulary(text: str, source: str = "<string>") -> Vocabulary:
    """Parse vocabulary text (see the module docstring); errors name ``source`` and the line."""
    return _build([_parse_line(line, f"{source}:{number}")
                   for number, line in enumerate(text.splitlines(), 1) if _content(line)])


def load_vocabulary(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Vocabulary:
    """Read one vocabulary file or several (concatenated: phrases must be unique across them)."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise VocabularyError("no vocabulary file given")
    lines = []
    for path in map(Path, paths):
        if not path.is_file():
            raise VocabularyError(f"vocabulary file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        lines += [_parse_line(line, f"{path}:{number}")
                  for number, line in enumerate(text.splitlines(), 1) if _content(line)]
    return _build(lines)


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def command_phrases(texts: Sequence[str], vocabulary: str | os.PathLike | None, purpose: str) -> list[str]:
    """The normalised, deduplicated phrases of a command's ``--text`` (repeatable) then ``--vocabulary``
    file, in order; ``purpose`` says what they are for in the error when there are none."""
    blank = [t for t in texts if not normalize_phrase(t)]
    if blank:
        raise VocabularyError(f"--text must be a noun phrase, got {blank}")
    phrases = [normalize_phrase(t) for t in texts]
    if vocabulary:
        found = load_vocabulary(vocabulary).phrases
        if not found:
            raise VocabularyError(f"--vocabulary {vocabulary} holds no phrase")
        phrases += found
    if not phrases:
        raise VocabularyError(f"no phrase to {purpose}: give --text and/or --vocabulary")
    return list(dict.fromkeys(phrases))


@dataclass(frozen=True)
class _Line:
    where: str
    phrases: tuple[str, ...]
    parents: tuple[str, ...]
    lookalikes: tuple[str, ...]


def _content(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _parse_line(line: str, where: str) -> _Line:
    content = _content(line)
    rest, lookalikes = _split_once(content, "!", where)
    if "<" in lookalikes:
        raise VocabularyError(f"{where}: '<' parents must come before '!' look-alikes: {content!r}")
    rest, parents = _split_once(rest, "<", where)
    phrases = _phrase_list(rest, "|", where, "phrase")
    if not phrases:
        raise VocabularyError(f"{where}: no phrase before '<' or '!': {content!r}")
    return _Line(where, phrases, _phrase_list(parents, ",", where, "parent"),
                 _phrase_list(lookalikes, ",", where, "look-alike"))


def _split_once(text: str, mark: str, where: str) -> tuple[str, str]:
    if text.count(mark) > 1:
        raise VocabularyError(f"{where}: {mark!r} appears more than once: {text!r}")
    head, _, tail = text.partition(mark)
    if mark in text and not tail.strip():
        raise VocabularyError(f"{where}: nothing after {mark!r}: {text!r}")
    return head, tail


def _phrase_list(text: str, separator: str, where: str, what: str) -> tuple[str, ...]:
    if not text.strip():
        return ()
    for bad in "|<!":
        if bad != separator and bad in text:
            raise VocabularyError(f"{where}: unexpected {bad!r} in {what}s {text.strip()!r}")
    parts = [normalize_phrase(p) for p in text.split(separator)]
    if not all(parts):
        raise VocabularyError(f"{where}: empty {what} in {text.strip()!r}")
    if len(set(parts)) != len(parts):
        raise VocabularyError(f"{where}: a {what} is repeated in {text.strip()!r}")
    return tuple(parts)


def _build(lines: list[_Line]) -> Vocabulary:
    canonical: dict[str, str] = {}
    defined_at: dict[str, str] = {}
    for line in lines:
        for phrase in line.phrases:
            if phrase in defined_at:
                raise VocabularyError(f"{line.where}: {phrase!r} is already defined at {defined_at[phrase]}")
            defined_at[phrase] = line.where
            canonical[phrase] = line.phrases[0]

    def resolve(phrase: str, line: _Line, strict: bool) -> str:
        if phrase in canonical:
            return canonical[phrase]
        if strict:
            raise VocabularyError(f"{line.where}: parent {phrase!r} is not a concept of the vocabulary")
        return phrase

    concepts = []
    for line in lines:
        parents = tuple(dict.fromkeys(resolve(p, line, strict=True) for p in line.parents))
        lookalikes = tuple(dict.fromkeys(resolve(p, line, strict=False) for p in line.lookalikes))
        if line.phrases[0] in parents:
            raise VocabularyError(f"{line.where}: {line.phrases[0]!r} is its own parent")
        if line.phrases[0] in lookalikes:
            raise VocabularyError(f"{line.where}: {line.phrases[0]!r} is its own look-alike (a synonym?)")
        concepts.append(Concept(line.phrases[0], line.phrases[1:], parents, lookalikes, line.where))
    vocabulary = Vocabulary(tuple(concepts), canonical, {c.phrase: c for c in concepts})
    _check_hierarchy(vocabulary)
    return vocabulary


def _check_hierarchy(vocabulary: Vocabulary) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(phrase: str, path: list[str]) -> None:
        if state.get(phrase) == 2:
            return
        if state.get(phrase) == 1:
            cycle = " < ".join(path[path.index(phrase):] + [phrase])
            raise VocabularyError(f"{vocabulary._by_phrase[phrase].where}: parents form a cycle: {cycle}")
        state[phrase] = 1
        for parent in vocabulary._by_phrase[phrase].parents:
            visit(parent, path + [phrase])
        state[phrase] = 2

    for concept in vocabulary.concepts:
        visit(concept.phrase, [])
    for concept in vocabulary.concepts:
        related = vocabulary.ancestors(concept.phrase) | vocabulary.descendants(concept.phrase)
        clash = [p for p in concept.lookalikes if p in related]
        if clash:
            raise VocabularyError(f"{concept.where}: look-alike {clash[0]!r} is a parent or child of "
                                  f"{concept.phrase!r}: one is a kind of the other, it cannot be a negative")
