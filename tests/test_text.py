"""Caption cleaning and the vocabulary."""

import numpy as np
import pytest

from captioning.data import text


def test_clean_caption_lowercases_strips_punctuation_and_digits():
    assert text.clean_caption("A dog, running!  2 dogs; it's 4x4.") == [
        "a",
        "dog",
        "running",
        "dogs",
        "its",
    ]


def test_clean_caption_min_word_len_matches_seed():
    # The Keras notebook drops one-letter words such as "a".
    assert text.clean_caption("A girl in a pink dress .", min_word_len=2) == [
        "girl",
        "in",
        "pink",
        "dress",
    ]


def test_vocabulary_ids_and_min_count():
    captions = [["red", "circle"], ["red", "square"], ["blue", "circle"]]
    vocab = text.Vocabulary.build(captions, min_count=2)
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert vocab.words == ["circle", "red"]  # Equal counts: alphabetical.
    assert vocab.encode(["red", "blue"]) == [vocab.stoi["red"], text.UNK_ID]


def test_vocabulary_round_trip(tmp_path):
    vocab = text.Vocabulary.build([["a", "b", "b"]])
    path = tmp_path / "vocab.json"
    vocab.save(str(path))
    assert text.Vocabulary.load(str(path)) == vocab


def test_vocabulary_load_errors(tmp_path):
    with pytest.raises(text.VocabularyError, match="No vocabulary"):
        text.Vocabulary.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"itos": ["x"]}')
    with pytest.raises(text.VocabularyError, match="special tokens"):
        text.Vocabulary.load(str(bad))


def test_encode_and_decode_caption():
    vocab = text.Vocabulary.build([["red", "circle", "left"]])
    ids = text.encode_caption(["red", "circle", "left"], vocab, max_len=2)
    assert ids.tolist() == [1, vocab.stoi["red"], vocab.stoi["circle"], 2]
    assert vocab.decode(ids) == "red circle"
    batch = np.array([[vocab.stoi["left"], 2, 5], [0, 1, vocab.stoi["red"]]])
    assert vocab.decode_batch(batch) == ["left", "red"]
