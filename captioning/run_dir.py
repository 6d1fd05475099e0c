"""A run's folder (`--workdir`): what training leaves there, read and written in one place.

    run = RunDir("runs/scenes")
    config = run.config()                                  # config.json, the resolved config
    vocab, stats = run.vocab(), run.feature_stats()        # vocab.json, feature_stats.npz
    graphdef, params, step, progress = run.restore(config.model, len(vocab), feature_shape)
    run.write_json("eval/test_greedy.json", report)        # atomically
    run.append_results_row(row, columns)                   # results.md

Evaluation, caption mode, the web demo, SCST (which starts from another run's folder) and
`configs/run.py` read a finished run through this class; training writes it. The checkpoints
themselves are `captioning.checkpoint`'s (`checkpoints/{latest,best}`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
from flax import nnx

from captioning import checkpoint, faults, models
from captioning.data import text
from captioning.data.prepare import STATS_FILE, FeatureStats

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
RESULTS_FILE = "results.md"
_MISSING = "–"  # A results.md cell without a value.


class Inference(NamedTuple):
    """A run's decoder ready to decode: graph, restored parameters, and their checkpoint."""

    graphdef: nnx.GraphDef
    params: Any
    step: int
    progress: dict[str, Any]  # The checkpoint's progress: epoch, best_metric, best_epoch, ...


class RunDir:
    """The folder of one run. `path` need not exist yet (training creates it)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(str(path)))

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def file(self, name: str) -> str:
        """The path of `name` (e.g. "vocab.json", "eval/test_greedy.json") in the folder."""
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    # ---- the resolved config ---------------------------------------------------------------

    def config(self, hint: str = "--workdir must be") -> ml_collections.ConfigDict:
        """The config the run was trained with (config.json). `hint` starts the sentence that
        says what to give instead when it is missing."""
        path = self.file(CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: {hint} a run directory written by training."
            )
        with open(path, encoding="utf-8") as f:
            return ml_collections.ConfigDict(json.load(f))

    def saved_config(self) -> dict[str, Any] | None:
        """config.json as JSON (None when the run has none yet): what a resumed run compares."""
        if not self.has(CONFIG_FILE):
            return None
        with open(self.file(CONFIG_FILE), encoding="utf-8") as f:
            return json.load(f)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        self.write_json(CONFIG_FILE, json.loads(config.to_json()))

    # ---- vocabulary and feature statistics -------------------------------------------------

    def vocab(self) -> text.Vocabulary:
        """vocab.json (`text.VocabularyError` naming the file when it is missing)."""
        return text.Vocabulary.load(self.file(VOCAB_FILE))

    def write_vocab(self, vocab: text.Vocabulary) -> None:
        vocab.save(self.file(VOCAB_FILE))

    def feature_stats(self) -> FeatureStats:
        """feature_stats.npz: the standardisation of the run's features."""
        return FeatureStats.load(self.path)

    def check_channels(self, stats: FeatureStats, channels: int, source: str, hint: str) -> None:
        """Refuses features of `channels` channels from `source` (e.g. "config.encoder (vgg16)")
        when the run's statistics have another count; `hint` says what to do."""
        if channels != stats.mean.shape[-1]:
            raise ValueError(
                f"{self.file(STATS_FILE)} has {stats.mean.shape[-1]} channels but {source} gives "
                f"{channels}: {hint}"
            )

    def copy_inputs_from(self, other: RunDir) -> None:
        """Takes `other`'s vocabulary and feature statistics (SCST continues its run with them)."""
        for name in (VOCAB_FILE, STATS_FILE):
            shutil.copyfile(other.file(name), self.file(name))

    def missing_inputs(self) -> list[str]:
        """Which of vocab.json and feature_stats.npz the folder lacks (a run not trained to its
        end)."""
        return [name for name in (VOCAB_FILE, STATS_FILE) if not self.has(name)]

    # ---- checkpoints -----------------------------------------------------------------------

    def has_checkpoint(self, which: str = "latest") -> bool:
        """Whether `checkpoints/<which>` holds a finished checkpoint (a step folder)."""
        folder = self.file(os.path.join("checkpoints", which))
        return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))

    def restore(
        self,
        model_config: ml_collections.ConfigDict,
        vocab_size: int,
        feature_shape: tuple[int, ...],
        which: str = "best",
        field: str = "config.eval.checkpoint",
    ) -> Inference:
        """The decoder of `model_config` with the run's `which` parameters (best, else latest;
        latest; or a step number); no optimizer is built. A damaged checkpoint raises
        `faults.DamagedCheckpoint` naming the intact ones, to choose with the config `field`."""
        graphdef, params = models.abstract_model(model_config, vocab_size, feature_shape)
        params, step, progress = checkpoint.restore_params(self.path, params, which, field)
        return Inference(graphdef, params, step, progress)

    # ---- reports ---------------------------------------------------------------------------

    def read_json(self, name: str) -> Any:
        """A JSON file of the folder (history.json, eval/<split>_<method>.json, ...)."""
        with open(self.file(name), encoding="utf-8") as f:
            return json.load(f)

    def write_json(self, name: str, obj: Any) -> str:
        """Writes `obj` as JSON to `name` in the folder atomically (a temporary file, then a
        rename), creating its folder -> the path. A full disk raises `faults.DiskFull`."""
        path = self.file(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        data = json.dumps(obj, indent=2).encode("utf-8")
        with faults.writing(path, len(data), tmp):  # A full disk: one line, no *.tmp left.
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return path

    def append_results_row(self, row: Mapping[str, object], columns: Sequence[str]) -> None:
        """Appends `row` (keys not in `columns` ignored) to results.md; writes the header once.

        Missing columns and None show as a dash. Raises ValueError when the file already holds a
        table with other columns.
        """
        path = self.file(RESULTS_FILE)
        header = "| " + " | ".join(_format_cell(c) for c in columns) + " |"
        is_new = not os.path.exists(path) or os.path.getsize(path) == 0
        if not is_new:
            with open(path, encoding="utf-8") as f:
                first = f.readline().rstrip("\n")
            if first != header:
                raise ValueError(
                    f"{path} holds a table with other columns ({first!r}, expected {header!r}); "
                    "write to a new file or use the same columns."
                )
        else:
            os.makedirs(self.path, exist_ok=True)
        cells = [_format_cell(row.get(c)) for c in columns]
        with open(path, "a", encoding="utf-8") as f:
            if is_new:
                f.write(header + "\n|" + "|".join("---" for _ in columns) + "|\n")
            f.write("| " + " | ".join(cells) + " |\n")


def _format_cell(value: object) -> str:
    """Markdown cell: floats to 4 decimals, None as a dash, '|' escaped."""
    if value is None:
        return _MISSING
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return " ".join(str(value).split()).replace("|", "\\|") or _MISSING
