"""Pre-trained GloVe word vectors -> an embedding matrix aligned to the vocabulary.

    matrix_VxD, report = load_glove(config.model.glove_path, vocab, dim=200, seed=config.seed)

Reads the standard GloVe text format (`<word> <v1> ... <vD>` per line, e.g. `glove.6B.200d.txt`),
plain, gzipped (`.gz`) or inside `glove.6B.zip` (the member `glove.6B.<dim>d.txt` is picked); the
path may also be a folder holding one of those. A word2vec-style header line (`<count> <dim>`) is
skipped. Row 0 (`<pad>`) is zero; the other special tokens and words missing from the file get a
seeded normal init (std `scale`, by default the std of the vectors found), so the same seed gives
the same matrix. Only vocabulary words are parsed; every line's value count is checked.
Freezing or fine-tuning the matrix is the model's business.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from absl import logging

from captioning.data.text import PAD_ID, Vocabulary

WHERE_TO_GET = (
    "Download glove.6B.zip (~822 MB; 50d/100d/200d/300d vectors from Wikipedia+Gigaword) from "
    "https://nlp.stanford.edu/projects/glove/ and point config.model.glove_path at the zip, at "
    "glove.6B.<dim>d.txt inside it, or at the folder holding them."
)


class EmbeddingsNotFoundError(FileNotFoundError):
    """The GloVe file named by config.model.glove_path does not exist."""


class EmbeddingsError(ValueError):
    """A GloVe file is malformed or does not match the requested dimension."""


def resolve_glove_path(path: str | os.PathLike, dim: int) -> Path:
    """The GloVe file to read: `path` itself, or the usual file names inside a folder."""
    if not str(path):
        raise EmbeddingsNotFoundError(f"config.model.glove_path is empty. {WHERE_TO_GET}")
    path = Path(path).expanduser()
    if path.is_dir():
        names = (f"glove.6B.{dim}d.txt", f"glove.6B.{dim}d.txt.gz", "glove.6B.zip")
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise EmbeddingsNotFoundError(
                f"No GloVe file in {path} (config.model.glove_path): looked for "
                f"{', '.join(names)}. {WHERE_TO_GET}"
            )
        return found
    if not path.is_file():
        raise EmbeddingsNotFoundError(
            f"GloVe file {path} (config.model.glove_path) not found. {WHERE_TO_GET}"
        )
    return path


def _zip_member(archive: zipfile.ZipFile, path: Path, dim: int) -> str:
    members = [m for m in archive.namelist() if m.endswith(".txt")]
    for wanted in (f"glove.6B.{dim}d.txt", f".{dim}d.txt"):
        matches = [m for m in members if Path(m).name == wanted or m.endswith(wanted)]
        if matches:
            return matches[0]
    if len(members) == 1:
        return members[0]  # The dimension is checked when reading.
    raise EmbeddingsError(
        f"{path} holds no {dim}-d vectors (glove.6B.{dim}d.txt); members: {', '.join(members)}. "
        "Pick a dim the archive has (config.model.embed_dim) or another file."
    )


@contextlib.contextmanager
def _open_lines(path: Path, dim: int) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Yields (name for messages, binary line iterator) for a .txt, .gz or .zip GloVe file."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            member = _zip_member(archive, path, dim)
            with archive.open(member) as f:
                yield f"{path}:{member}", iter(f)
    elif path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            yield str(path), iter(f)
    else:
        with open(path, "rb") as f:
            yield str(path), iter(f)


def _split_line(parts: list[bytes], dim: int, name: str, number: int) -> tuple[bytes, list[bytes]]:
    """(word, values) of one line; a word holding spaces (GloVe 840B) is put back together."""
    if len(parts) == dim + 1:
        return parts[0], parts[1:]
    if len(parts) > dim + 1:
        try:
            float(parts[1])
        except ValueError:  # Not a number: the word itself holds spaces.
            return b" ".join(parts[:-dim]), parts[-dim:]
    raise EmbeddingsError(
        f"{name}:{number}: {len(parts) - 1} values, expected {dim} like the first line. The file "
        "is damaged or truncated: download it again."
    )


def read_vectors(path: Path, wanted: dict[str, int], dim: int) -> dict[int, np.ndarray]:
    """Vocabulary id -> vector for the `wanted` words present in the file (first one wins)."""
    vectors: dict[int, np.ndarray] = {}
    file_dim = None
    with _open_lines(path, dim) as (name, lines):
        for number, raw in enumerate(lines, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            parts = raw.rstrip(b"\r\n ").split(b" ")
            if parts == [b""]:
                continue
            if file_dim is None:
                if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header: "<count> <dim>".
                file_dim = len(parts) - 1
                if file_dim != dim:
                    raise EmbeddingsError(
                        f"{name} has {file_dim}-d vectors but {dim}-d were requested. Use "
                        f"glove.6B.{dim}d.txt, or set the embedding size (config.model.embed_dim) "
                        f"to {file_dim}."
                    )
            word_bytes, values = _split_line(parts, dim, name, number)
            try:
                word = word_bytes.decode("utf-8")
            except UnicodeDecodeError:
                raise EmbeddingsError(
                    f"{name}:{number}: the word {word_bytes[:40]!r} is not UTF-8. Download the "
                    "file again."
                ) from None
            index = wanted.get(word)
            if index is None or index in vectors:
                continue
            try:
                vectors[index] = np.array([float(v) for v in values], np.float32)
            except ValueError:
                raise EmbeddingsError(
                    f"{name}:{number}: a value of {word!r} is not a number. Download the file "
                    "again."
                ) from None
    if file_dim is None:
        raise EmbeddingsError(f"{path} holds no vectors. Download it again. {WHERE_TO_GET}")
    return vectors


def load_glove(
    path: str | os.PathLike,
    vocab: Vocabulary,
    dim: int,
    *,
    seed: int,
    scale: float | None = None,
) -> tuple[np.ndarray, dict]:
    """GloVe vectors for `vocab`: a [len(vocab), dim] float32 matrix and a coverage report.

    Args:
      path: a glove .txt, .txt.gz or .zip file, or a folder holding one (config.model.glove_path).
      vocab: the vocabulary whose ids index the rows.
      dim: vector size; must match the file.
      seed: seeds the random rows (special tokens and words missing from the file).
      scale: std of the random rows; None uses the std of the vectors found (0.1 if none).

    Returns:
      (matrix_VxD, report) with report = {found, missing, coverage, missing_examples}; `found` and
      `missing` count vocabulary words (special tokens excluded), `missing_examples` lists up to 20
      missing words, most frequent first.
    """
    source = resolve_glove_path(path, dim)
    wanted = {w: vocab.stoi[w] for w in vocab.words}
    vectors = read_vectors(source, wanted, dim)

    if scale is None:
        scale = float(np.std(np.stack(list(vectors.values())))) if vectors else 0.1
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((len(vocab), dim)) * scale).astype(np.float32)
    for index, vector in vectors.items():
        matrix[index] = vector
    matrix[PAD_ID] = 0.0

    missing = [w for w in vocab.words if wanted[w] not in vectors]
    report = {
        "found": len(vectors),
        "missing": len(missing),
        "coverage": len(vectors) / max(1, len(vocab.words)),
        "missing_examples": missing[:20],
    }
    logging.info(
        "GloVe %s: %d of %d vocabulary words found (%.1f%%); missing, e.g.: %s",
        source,
        report["found"],
        len(vocab.words),
        100 * report["coverage"],
        ", ".join(report["missing_examples"]) or "none",
    )
    return matrix, report
