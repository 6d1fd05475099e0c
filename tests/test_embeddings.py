"""GloVe loading: file formats, alignment to the vocabulary, coverage and errors."""

import gzip
import logging
import zipfile

import numpy as np
import pytest

from captioning.data import embeddings
from captioning.data.embeddings import EmbeddingsError, EmbeddingsNotFoundError, load_glove
from captioning.data.text import PAD_ID, Vocabulary

VECTORS = {
    "the": [0.1, 0.2, 0.3, 0.4],
    "dog": [1.0, -1.0, 0.5, 0.25],
    "runs": [-0.5, 0.5, -0.25, 2.0],
    "grass": [0.0, 3.0, -3.0, 1.5],
    "cat": [9.0, 9.0, 9.0, 9.0],
}
VOCAB = Vocabulary(["dog", "runs", "grass", "zebra"])  # "zebra" is not in the file.


def glove_text(vectors=VECTORS) -> str:
    return "".join(f"{w} {' '.join(str(v) for v in vec)}\n" for w, vec in vectors.items())


def check_matrix(matrix, report):
    assert matrix.shape == (len(VOCAB), 4) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[PAD_ID], 0)
    for word in ("dog", "runs", "grass"):
        np.testing.assert_allclose(matrix[VOCAB.stoi[word]], VECTORS[word])
    assert np.abs(matrix[VOCAB.stoi["zebra"]]).sum() > 0  # Random init, not zeros.
    assert report == {
        "found": 3,
        "missing": 1,
        "coverage": 0.75,
        "missing_examples": ["zebra"],
    }


def test_plain_text(tmp_path, caplog):
    path = tmp_path / "glove.6B.4d.txt"
    path.write_text(glove_text())
    caplog.set_level(logging.INFO)
    matrix, report = load_glove(path, VOCAB, 4, seed=0)
    check_matrix(matrix, report)
    assert any("3 of 4 vocabulary words found (75.0%)" in r.getMessage() for r in caplog.records)


def test_gzip(tmp_path):
    path = tmp_path / "glove.6B.4d.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(glove_text())
    check_matrix(*load_glove(path, VOCAB, 4, seed=0))


def test_zip_picks_the_requested_dim(tmp_path):
    path = tmp_path / "glove.6B.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("glove.6B.2d.txt", "dog 1 2\nruns 3 4\n")
        archive.writestr("glove.6B.4d.txt", glove_text())
    check_matrix(*load_glove(path, VOCAB, 4, seed=0))
    matrix, report = load_glove(path, VOCAB, 2, seed=0)
    assert matrix.shape == (len(VOCAB), 2) and report["found"] == 2
    with pytest.raises(EmbeddingsError, match=r"no 3-d vectors.*glove\.6B\.2d\.txt"):
        load_glove(path, VOCAB, 3, seed=0)


def test_folder_path_finds_the_file(tmp_path):
    (tmp_path / "glove.6B.4d.txt").write_text(glove_text())
    check_matrix(*load_glove(tmp_path, VOCAB, 4, seed=0))


def test_seeded_random_rows_and_scale(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text(glove_text())
    a, _ = load_glove(path, VOCAB, 4, seed=1)
    b, _ = load_glove(path, VOCAB, 4, seed=1)
    c, _ = load_glove(path, VOCAB, 4, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    small, _ = load_glove(path, VOCAB, 4, seed=1, scale=1e-3)
    assert np.abs(small[1:4]).max() < 0.01  # Special tokens <start> <end> <unk>.


def test_word2vec_header_and_words_with_spaces(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("3 4\n" + glove_text({"dog": VECTORS["dog"]}) + "a b 1 2 3 4\nruns 1 1 1 1\n")
    matrix, report = load_glove(path, Vocabulary(["dog", "runs"]), 4, seed=0)
    assert report["found"] == 2
    np.testing.assert_allclose(matrix[4], VECTORS["dog"])


def test_wrong_number_of_values_names_file_and_line(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text(glove_text() + "horse 1 2 3\n")
    with pytest.raises(EmbeddingsError, match=r"g\.txt:6: 3 values, expected 4"):
        load_glove(path, VOCAB, 4, seed=0)


def test_dim_mismatch_names_both(tmp_path):
    path = tmp_path / "glove.6B.4d.txt"
    path.write_text(glove_text())
    with pytest.raises(EmbeddingsError, match=r"glove\.6B\.4d\.txt has 4-d vectors but 50-d"):
        load_glove(path, VOCAB, 50, seed=0)


def test_bad_values_and_bytes(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text(glove_text() + "zebra 1 x 3 4\n")
    with pytest.raises(EmbeddingsError, match=r"g\.txt:6: a value of 'zebra' is not a number"):
        load_glove(path, VOCAB, 4, seed=0)
    path.write_bytes(glove_text().encode() + b"caf\xe9 1 2 3 4\n")
    with pytest.raises(EmbeddingsError, match=r"g\.txt:6: the word .* is not UTF-8"):
        load_glove(path, VOCAB, 4, seed=0)
    path.write_text("")
    with pytest.raises(EmbeddingsError, match="holds no vectors"):
        load_glove(path, VOCAB, 4, seed=0)


def test_missing_file_says_where_to_get_it(tmp_path):
    for path in (tmp_path / "glove.6B.100d.txt", tmp_path, ""):
        with pytest.raises(EmbeddingsNotFoundError) as info:
            load_glove(path, VOCAB, 100, seed=0)
        message = str(info.value)
        assert "https://nlp.stanford.edu/projects/glove/" in message
        assert "glove.6B.zip" in message and "config.model.glove_path" in message
    assert issubclass(EmbeddingsNotFoundError, FileNotFoundError)
    assert embeddings.WHERE_TO_GET.count("822 MB") == 1
