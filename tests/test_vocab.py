import json
import re

import pytest

from storyteller.vocab import SPECIAL_TOKENS, Vocabulary, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A Dog's ball, in the T-shirt .") == ["a", "dogs", "ball", "in", "the", "t", "shirt"]
    assert tokenize("  ...  ") == []
    assert tokenize("Two  men\tand\na_dog!") == ["two", "men", "and", "a", "dog"]


def test_build_respects_min_freq_and_is_deterministic():
    caps = ["a dog runs", "a dog sits", "a cat sits", "the dog"]
    v = Vocabulary.build(caps, min_freq=2)
    assert v.itos[:4] == list(SPECIAL_TOKENS)
    # by count (a:3, dog:3, sits:2), ties alphabetical; words seen once are left out
    assert v.itos[4:] == ["a", "dog", "sits"]
    assert Vocabulary.build(list(reversed(caps)), min_freq=2) == v
    with pytest.raises(ValueError):
        Vocabulary.build(caps, min_freq=0)


def test_encode_decode_roundtrip_and_unknowns():
    v = Vocabulary.build(["a dog runs on grass"], min_freq=1)
    ids = v.encode("A dog runs on the grass.")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.unk_id in ids  # "the" is unknown
    # decoding never shows special tokens, and stops at <end>
    assert v.decode(ids) == "a dog runs on grass"
    assert v.decode([v.start_id, v.stoi["dog"], v.end_id, v.stoi["a"]]) == "dog"
    assert v.decode([v.pad_id, v.stoi["a"], v.pad_id]) == "a"


def test_json_roundtrip_and_refuses_bad_files(tmp_path):
    v = Vocabulary.build(["a dog runs", "a cat"], min_freq=1)
    p = tmp_path / "vocab.json"
    v.save(p)
    assert Vocabulary.load(p) == v
    d = json.loads(p.read_text())
    d["tokenizer"] = "something-else"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="tokenizer"):
        Vocabulary.load(p)
    p.write_text('{"tokenizer": "lower-strip-punct-v1", "itos": ["a", "b"]}')
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary.load(p)
    p.write_text("not json")
    with pytest.raises(ValueError, match="JSON"):
        Vocabulary.load(p)


def test_words_may_not_shadow_special_tokens():
    with pytest.raises(ValueError):
        Vocabulary(["<end>", "dog"])


@pytest.mark.parametrize("typed, plain", [
    ("cafe\u0301 on a street", "café on a street"),     # combining acute accent -> precomposed é
    ("a \uff24\uff2f\uff27 runs", "a dog runs"),           # full-width letters
    ("\u0130stanbul at night", "istanbul at night"),      # dotted capital I: lower() adds a combining dot
    ("two \ufb01sh", "two fish"),                         # the "fi" ligature
    ("it\u2019s a dog\u2024", "its a dog"),               # curly apostrophe, one-dot leader
])
def test_tokenize_normalises_unicode_before_lowercasing(typed, plain):
    assert tokenize(typed) == tokenize(plain)
    assert all(t.isalnum() for t in tokenize(typed))


def test_plain_ascii_tokens_are_unchanged_by_normalisation():
    """NFKC is the identity on ASCII, so vocabularies and scores made before it stay valid."""
    import string

    text = string.printable + " A Dog's ball, in the T-shirt ."
    expected = re.sub(r"[^\w\s]|_", " ", re.sub(r"['`]", "", text.lower())).split()
    assert tokenize(text) == expected
