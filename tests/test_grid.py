"""The ablation grid: grid files, dotted overrides, the table, and the grid command itself on the
two-cell tiny grid (configs/grids/test.py), plus a failing cell and a rerun without retraining."""

import json
import os
import subprocess
import sys

import pytest

from captioning.tools import grid
from configs import test as test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_GRID = os.path.join(REPO, "configs", "grids", "test.py")
# Keeps the two trainings short: one epoch, one length bucket (one compiled step), short decoding.
SHORT = {"train.num_epochs": 1, "train.num_buckets": 1, "decode.max_len": 8}


def test_parse_cells_checks_names_keys_and_methods():
    cells = grid.parse_cells([{"name": "a", "overrides": {"model.decoder": "inject"}}])
    assert cells[0].methods == ({},)
    with pytest.raises(grid.GridError, match="unique"):
        grid.parse_cells([{"name": "a"}, {"name": "a"}])
    with pytest.raises(grid.GridError, match="folder name"):
        grid.parse_cells([{"name": "../escape"}])
    with pytest.raises(grid.GridError, match="unknown keys"):
        grid.parse_cells([{"name": "a", "override": {}}])
    with pytest.raises(grid.GridError, match="decode"):
        grid.parse_cells([{"name": "a", "methods": [{"model.decoder": "merge"}]}])
    with pytest.raises(grid.GridError, match="no cells"):
        grid.parse_cells([])


def test_apply_overrides_copies_and_names_bad_fields():
    base = test_config.get_config()
    config = grid.apply_overrides(base, {"model.decoder": "inject", "encoder.grid": 2})
    assert config.model.decoder == "inject" and config.encoder.grid == 2
    assert base.model.decoder == "merge_attention" and base.encoder.grid == 4  # Untouched.
    with pytest.raises(grid.GridError, match="no field 'decodr'"):
        grid.apply_overrides(base, {"model.decodr": "attention"})
    with pytest.raises(grid.GridError, match="no section 'modle'"):
        grid.apply_overrides(base, {"modle.decoder": "attention"})
    with pytest.raises(grid.GridError, match="train.num_epochs"):
        grid.apply_overrides(base, {"train.num_epochs": "many"})


def test_method_labels():
    decode = test_config.get_config().decode
    assert grid.method_label(decode) == "greedy"
    decode.method, decode.beam_size = "beam", 5
    assert grid.method_label(decode) == "beam5"
    decode.length_penalty = 0.7
    assert grid.method_label(decode) == "beam5_lp0.7"
    decode.block_repeats = False
    assert grid.method_label(decode) == "beam5_lp0.7_unblocked"
    decode.method = "greedy"
    assert grid.method_label(decode) == "greedy_unblocked"


def test_table_keeps_present_metrics_and_failed_cells(tmp_path):
    cells = grid.parse_cells([{"name": "ok"}, {"name": "broken"}, {"name": "later"}])
    rows = {
        "ok": [
            {
                "cell": "ok",
                "method": "greedy",
                "split": "test",
                "CIDEr": 0.5,
                "train_s": 3.0,
                "status": "ok",
            }
        ],
        "broken": [{"cell": "broken", "method": "greedy", "status": "failed: ValueError: x|y"}],
    }
    path = tmp_path / "grid.md"
    grid.write_table(str(path), cells, rows, header="title")
    lines = path.read_text().splitlines()
    assert lines[0] == "title"
    header = next(line for line in lines if line.startswith("| cell"))
    assert "CIDEr" in header and "Bleu_1" not in header
    assert any("| ok | greedy | test | 0.5000 |" in line for line in lines)
    assert any("failed: ValueError: x\\|y" in line for line in lines)
    assert any(line.startswith("| later | - |") and "not run" in line for line in lines)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """Runs the grid command as a user would: two cells, each decoded greedily and with beam 2."""
    root = tmp_path_factory.mktemp("grid")
    workdir, cache = str(root / "grid"), str(root / "cache")
    overrides = [f"--config.{k}={v}" for k, v in SHORT.items()]
    command = [
        sys.executable,
        "-m",
        "captioning.tools.grid",
        f"--config={os.path.join(REPO, 'configs', 'test.py')}",
        f"--grid={TEST_GRID}",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stderr.txt").write_text(result.stderr)
    return workdir, cache


def _table_rows(workdir):
    with open(os.path.join(workdir, "grid.md"), encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    return header, [
        dict(zip(header, (c.strip() for c in line.strip().strip("|").split("|")), strict=True))
        for line in lines[1:]
    ]


def test_grid_command_trains_each_cell_once_and_tabulates_every_method(grid_run):
    workdir, _ = grid_run
    header, rows = _table_rows(workdir)
    for column in ("Bleu_4", "CIDEr", "attribute_accuracy", "relation_accuracy", "train_s"):
        assert column in header
    assert [(r["cell"], r["method"], r["split"]) for r in rows] == [
        (cell, method, split)
        for cell in ("merge_avg", "attention_spatial")
        for method in ("greedy", "beam2")
        for split in ("test", "test_perturbed")
    ]
    assert all(r["status"] == "ok" and float(r["train_s"]) > 0 for r in rows)
    for cell in ("merge_avg", "attention_spatial"):
        cell_dir = os.path.join(workdir, cell)
        with open(os.path.join(cell_dir, "history.json"), encoding="utf-8") as f:
            assert len(json.load(f)) == 1  # Trained once; beam was evaluated, not retrained.
        for method in ("greedy", "beam"):
            assert os.path.exists(os.path.join(cell_dir, "eval", f"test_{method}.json"))
    with open(os.path.join(workdir, "attention_spatial", "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["model"]["decoder"] == "attention" and saved["encoder"]["pooling"] == "none"
    assert saved["train"]["num_epochs"] == 1  # The --config.* override reached every cell.


def test_grid_command_keeps_freed_memory_as_main_does(grid_run):
    workdir, _ = grid_run  # Without it every step faults its buffers in again (captioning/host.py).
    with open(os.path.join(os.path.dirname(workdir), "stderr.txt"), encoding="utf-8") as f:
        assert "malloc keeps freed memory" in f.read()


def test_failing_cell_is_reported_and_finished_cells_are_not_retrained(grid_run):
    workdir, cache = grid_run
    config = grid.apply_overrides(test_config.get_config(), {**SHORT, "data.cache_dir": cache})
    cells = [*grid.load_grid(TEST_GRID), grid.Cell("broken", {"model.decoder": "transformer"})]
    history = os.path.join(workdir, "merge_avg", "history.json")
    before = os.path.getmtime(history)
    rows = grid.run_grid(config, cells, workdir)
    assert os.path.getmtime(history) == before  # Recorded cells are reused as they are.
    assert [r["status"] for r in rows[:8]] == ["ok"] * 8
    broken = rows[8]
    assert broken["cell"] == "broken" and broken["status"].startswith("failed: ValueError")
    assert "config.model.decoder" in broken["status"]
    assert os.path.exists(os.path.join(workdir, "broken", "error.txt"))
    _, table = _table_rows(workdir)
    assert table[-1]["cell"] == "broken" and table[-1]["status"].startswith("failed")


def test_seeds_expand_cells_and_summarize_mean_std():
    cells = grid.with_seeds([grid.Cell("base", {"model.decoder": "merge"})], [0, 3])
    assert [c.name for c in cells] == ["base_seed0", "base_seed3"]
    assert cells[1].overrides == {"model.decoder": "merge", "seed": 3}
    assert grid.apply_overrides(test_config.get_config(), cells[1].overrides).seed == 3
    rows = [
        {"cell": "base_seed0", "method": "greedy", "split": "test", "CIDEr": 1.0, "status": "ok"},
        {"cell": "base_seed3", "method": "greedy", "split": "test", "CIDEr": 3.0, "status": "ok"},
        {"cell": "base_seed0", "method": "greedy", "split": "test_perturbed", "CIDEr": 0.5,
         "status": "ok"},
        {"cell": "base_seed9", "method": "greedy", "split": "test", "status": "failed: x"},
        {"cell": "other", "method": "greedy", "split": "test", "CIDEr": 9.0, "status": "ok"},
    ]  # fmt: skip
    summary = grid.summarize_seeds(rows)
    assert [(s["cell"], s["split"], s["seeds"]) for s in summary] == [
        ("base", "test", 2),
        ("base", "test_perturbed", 1),
    ]
    assert summary[0]["CIDEr"]["mean"] == 2.0 and summary[0]["CIDEr"]["min"] == 1.0
    assert summary[0]["CIDEr"]["std"] == pytest.approx(2**0.5)  # Sample standard deviation.
    assert grid._cell_text("CIDEr", summary[0]["CIDEr"]) == "2.0000 ± 1.4142"
