"""Vocabulary files: format, lookups, hard-negative candidates, errors with file:line, shipped files."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines.vocab import VocabularyError, load_vocabulary, parse_vocabulary

VOCAB_DIR = Path(__file__).resolve().parents[1] / "configs" / "agriculture" / "vocab"

ORCHARD = """\
# an orchard
apple | Apple_Fruit            # trailing comment
ripe apple | red apple | mature apple < apple ! unripe apple, tomato
unripe apple | green apple < apple ! ripe apple, leaf

apple blossom | apple flower ! apple
leaf
"""


def test_phrases_synonyms_parents_and_lookalikes() -> None:
    vocab = parse_vocabulary(ORCHARD, "orchard.txt")
    assert vocab.phrases == ["apple", "ripe apple", "unripe apple", "apple blossom", "leaf"]
    assert vocab.canonical("Red  Apple") == "ripe apple" and vocab.canonical("apple fruit") == "apple"
    assert vocab.synonyms["mature apple"] == "ripe apple" and vocab.synonyms["leaf"] == "leaf"
    assert vocab.prompts("green apple") == ("unripe apple", "green apple")
    assert vocab.ancestors("red apple") == {"apple"} and vocab.descendants("apple") == {
        "ripe apple",
        "unripe apple",
    }
    assert vocab.hard_negative_pairs == [
        ("ripe apple", "unripe apple"),
        ("ripe apple", "tomato"),
        ("unripe apple", "ripe apple"),
        ("unripe apple", "leaf"),
        ("apple blossom", "apple"),
    ]
    assert vocab.hard_negatives("apple") == ["apple blossom"]  # the relation is symmetric
    assert vocab.hard_negatives("ripe apple") == ["unripe apple", "tomato"]
    assert vocab.concept("ripe apple").where == "orchard.txt:3"
    assert "tomato" not in vocab and "Ripe Apple" in vocab
    with pytest.raises(KeyError, match="'pear' is not in the vocabulary"):
        vocab.canonical("pear")


def test_hard_negative_candidates_never_contradict_the_positives() -> None:
    vocab = parse_vocabulary(ORCHARD)
    # an image with ripe apples: "apple" is implied, its look-alikes are candidates
    assert vocab.hard_negative_candidates(["ripe apple"]) == ["unripe apple", "tomato"]
    # with unripe apples as well, neither ripeness is a negative; blossom's look-alike "apple" is implied
    assert vocab.hard_negative_candidates(["red apple", "unripe apple", "apple blossom"]) == [
        "tomato",
        "leaf",
    ]
    # a generic "apple" positive may hide either ripeness: its children are not negatives
    assert vocab.hard_negative_candidates(["apple"]) == ["apple blossom"]
    assert vocab.implied(["apple", "weed"]) == {"apple", "ripe apple", "unripe apple", "weed"}


def test_plain_phrase_list_is_a_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("red apple\npear\n\n# comment\n")
    vocab = load_vocabulary(path)
    assert vocab.phrases == ["red apple", "pear"] and vocab.hard_negative_pairs == []


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("apple\npear | apple", 2, r"'apple' is already defined at .*v.txt:1"),
        ("apple | | red apple", 1, "empty phrase"),
        ("apple ! pear ! quince", 1, "'!' appears more than once"),
        ("apple ! pear < fruit", 1, "'<' parents must come before '!'"),
        ("apple !", 1, "nothing after '!'"),
        ("| apple", 1, "empty phrase"),
        ("ripe apple < fruit", 1, "parent 'fruit' is not a concept"),
        ("a < b\nb < c\nc < a", 1, "parents form a cycle: a < b < c < a"),
        ("apple\nripe apple | red apple < apple ! apple", 2, "look-alike 'apple' is a parent or child"),
        ("red apple | ripe apple ! ripe apple", 1, "own look-alike"),
        ("apple ! x, , y", 1, "empty look-alike"),
        ("apple ! pear, pear", 1, "look-alike is repeated"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "v.txt"
    path.write_text(text)
    with pytest.raises(VocabularyError, match=message) as err:
        load_vocabulary(path)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_duplicates_across_files_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("weed\n")
    (tmp_path / "b.txt").write_text("crop ! weed\nweed plant | weed\n")
    with pytest.raises(VocabularyError, match=r"b.txt:2: 'weed' is already defined at .*a.txt:1"):
        load_vocabulary([tmp_path / "a.txt", tmp_path / "b.txt"])
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(tmp_path / "none.txt")


def test_shipped_agriculture_vocabularies() -> None:
    files = sorted(VOCAB_DIR.glob("*.txt"))
    assert [f.stem for f in files] == ["crop_organs", "diseases", "fruit", "weeds"]
    for path in files:
        vocab = load_vocabulary(path)
        assert len(vocab) >= 20 and len(vocab.hard_negative_pairs) >= 20, path
    everything = load_vocabulary(files)  # one orchard/field vocabulary: phrases unique across files
    assert len(everything) == sum(len(load_vocabulary(f)) for f in files)
    assert "fat hen" in everything.hard_negatives("sugar beet")  # crop vs its look-alike weed
    assert "charlock" in everything.hard_negatives("canola")
    assert "weed" in everything.hard_negatives("crop") and "crop" in everything.hard_negatives("weed")
    assert everything.ancestors("wheat seedling") == {
        "wheat",
        "cereal crop",
        "crop seedling",
        "crop",
        "plant",
    }
    assert {"ripe apple", "unripe apple", "apple blossom"} <= set(everything.phrases)
    assert everything.canonical("corn") == "maize" and everything.canonical("lamb's quarters") == "fat hen"
    candidates = everything.hard_negative_candidates(["sugar beet"])
    assert "fat hen" in candidates and "crop" not in candidates and "plant" not in candidates
