"""RunDir: a run folder's config, vocabulary, statistics, channel check and reports."""

import json

import ml_collections
import numpy as np
import pytest

from captioning.data import text
from captioning.data.prepare import FeatureStats
from captioning.run_dir import RunDir
from configs import run as run_config


def test_config_vocab_and_stats_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.saved_config() is None and run.missing_inputs() == [
        "vocab.json",
        "feature_stats.npz",
    ]
    with pytest.raises(FileNotFoundError, match="--workdir must be a run directory"):
        run.config()
    with pytest.raises(FileNotFoundError, match="after 'configs/run.py:' give a run directory"):
        run_config.get_config(run.path)
    config = ml_collections.ConfigDict({"model": {"decoder": "merge", "hidden_size": 8}})
    run.write_config(config)
    assert run.config() == config and run_config.get_config(str(tmp_path / "run")) == config
    assert run.saved_config() == json.loads(config.to_json())
    run.write_vocab(text.Vocabulary(["red", "circle"]))
    FeatureStats(np.zeros(3, np.float32), np.ones(3, np.float32)).save(run.path)
    assert run.vocab().words == ["red", "circle"] and run.missing_inputs() == []
    copy = RunDir(tmp_path / "copy")
    copy.write_json("config.json", {})  # Creates the folder.
    copy.copy_inputs_from(run)
    assert copy.vocab() == run.vocab()
    np.testing.assert_array_equal(copy.feature_stats().std, np.ones(3))


def test_channel_check_names_the_file_and_what_to_do(tmp_path):
    run = RunDir(tmp_path)
    stats = FeatureStats(np.zeros(2048, np.float32), np.ones(2048, np.float32))
    run.check_channels(stats, 2048, "config.encoder (inception_v3)", "never said")
    with pytest.raises(ValueError, match=r"feature_stats.npz has 2048 channels but .*vgg16.* 512"):
        run.check_channels(stats, 512, "config.encoder (vgg16)", "omit --config.")


def test_reports_are_written_whole_and_results_rows_append(tmp_path):
    run = RunDir(tmp_path / "sub")
    path = run.write_json("eval/test_greedy.json", {"metrics": {"CIDEr": 1.5}})
    assert run.read_json("eval/test_greedy.json") == {"metrics": {"CIDEr": 1.5}}
    assert path == str(tmp_path / "sub" / "eval" / "test_greedy.json")
    assert not run.has("eval/test_greedy.json.tmp") and not run.has_checkpoint()
    columns = ("run", "Bleu_4", "METEOR", "CIDEr")
    run.append_results_row({"run": "merge", "Bleu_4": 0.123456, "CIDEr": 1}, columns)
    run.append_results_row({"run": "a|b", "Bleu_4": None, "METEOR": 0.2}, columns)
    assert (tmp_path / "sub" / "results.md").read_text().splitlines() == [
        "| run | Bleu_4 | METEOR | CIDEr |",
        "|---|---|---|---|",
        "| merge | 0.1235 | – | 1 |",
        "| a\\|b | – | 0.2000 | – |",
    ]
    with pytest.raises(ValueError, match="other columns"):
        run.append_results_row({"run": "x"}, ("run",))
