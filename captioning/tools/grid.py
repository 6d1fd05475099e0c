"""Ablation grids and seed sweeps: trains and evaluates config variants, one table of everything.

    python -m captioning.tools.grid --config=configs/scenes.py --grid=configs/grids/scenes.py \
        --workdir=runs/grid [--config.train.num_epochs=8] [--cells=merge_avgmax,attention_grid4]
    python -m captioning.tools.grid --config=configs/scenes.py --seeds=0,1,2,3,4 \
        --workdir=runs/seeds

The grid file defines `get_grid()` returning a list of cells:

    {"name": "attention_grid4",                                    # folder under --workdir
     "overrides": {"model.decoder": "attention", "encoder.pooling": "none", "encoder.grid": 4},
     "methods": [{"decode.method": "greedy"},                      # optional; default: the
                 {"decode.method": "beam", "decode.beam_size": 3}]}  # config's decoding only

Every cell is the base config (with its `--config.*` overrides) plus the cell's dotted overrides,
trained once with `train.train_and_evaluate` in `--workdir/<name>` (which also evaluates the first
method on `eval.split` and `eval.extra_splits`); each further method is one more
`evaluate.evaluate` of the same checkpoint, never a retraining. `--seeds` runs every cell (or,
without `--grid`, the config itself) once per seed, as `<cell>_seed<k>`, and puts the mean ± std
over seeds of every metric above the per-run table (all values in `seeds.json`): seeds change the
scenes, initialisation, dropout and data order, so they show how far a result holds. Cells with
the same encoder settings share one feature store (`data.cache_dir`); the store is exported before
the clock starts, so `train_s` (wall-clock of `train_and_evaluate`) compares decoders, not who
exported first.

`--workdir/grid.md` gets one row per (cell, method, split) with the evaluation reports' metrics
that results.md shows (`metrics.columns()`, of any dataset), the epoch the validation metric
chose, the epochs trained, train_s and decode_s; it is rewritten after every cell, so a long grid
shows its progress. A cell that fails is a row with its
error (the traceback is in `<cell>/error.txt`); the other cells still run. A finished cell records
itself in `<cell>/grid_cell.json` and is not retrained when the grid is run again with the same
config; `--cells` runs a subset and the table still lists every cell the workdir holds.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from captioning.evaluation import metrics

CELL_FILE = "grid_cell.json"
TABLE_FILE = "grid.md"
SUMMARY_FILE = "seeds.json"  # Mean, std, min, max and values over seeds of every metric.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class GridError(ValueError):
    """The grid file or one of its overrides is malformed; the message names the cell and field."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One trained variant: `overrides` (dotted field -> value) on the base config, evaluated
    with every entry of `methods` (each dotted overrides of `decode.*`/`eval.*`)."""

    name: str
    overrides: dict[str, Any]
    methods: tuple[dict[str, Any], ...] = ({},)


# ---------------------------------------------------------------------------------------------
# Grid files and overrides
# ---------------------------------------------------------------------------------------------


def parse_cells(raw_cells: Sequence[Mapping[str, Any]], source: str = "the grid") -> list[Cell]:
    """Validates `get_grid()`'s list of dicts -> cells (unique, folder-safe names)."""
    cells, seen = [], set()
    for i, raw in enumerate(raw_cells):
        if not isinstance(raw, Mapping) or "name" not in raw:
            raise GridError(f"{source}: cell {i} must be a dict with a 'name', got {raw!r}.")
        name = str(raw["name"])
        if not _NAME.match(name):
            raise GridError(
                f"{source}: cell name {name!r} must be a folder name (letters, digits, _ . -)."
            )
        if name in seen:
            raise GridError(f"{source}: two cells are named {name!r}; names must be unique.")
        seen.add(name)
        unknown = set(raw) - {"name", "overrides", "methods"}
        if unknown:
            raise GridError(
                f"{source}: cell {name!r} has unknown keys {sorted(unknown)}; "
                "use name, overrides, methods."
            )
        overrides = dict(raw.get("overrides", {}))
        methods = tuple(dict(m) for m in raw.get("methods", None) or [{}])
        for method in methods:
            bad = [k for k in method if not k.startswith(("decode.", "eval."))]
            if bad:
                raise GridError(
                    f"{source}: cell {name!r} method {method!r} sets {bad}; a method may only "
                    "set decode.* and eval.* fields (others need a cell of their own)."
                )
        cells.append(Cell(name, overrides, methods))
    if not cells:
        raise GridError(f"{source}: get_grid() returned no cells.")
    return cells


def load_grid(path: str) -> list[Cell]:
    """Imports a grid file and returns its validated cells."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--grid={path}: no such file (e.g. configs/grids/scenes.py).")
    spec = importlib.util.spec_from_file_location("_grid_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_grid"):
        raise GridError(f"{path} defines no get_grid() returning the list of cells.")
    return parse_cells(module.get_grid(), source=path)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = "override"
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted fields set, e.g. {"model.decoder": "attention"}.

    Raises GridError naming the field when it does not exist (a typo would otherwise silently
    train the base config) or when the value has the wrong type.
    """
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                section = ".".join(parents[: depth + 1])
                raise GridError(f"{where}: {dotted!r}: the config has no section {section!r}.")
            node = node[part]
        if leaf not in node:
            section = ".".join(parents) or "config"
            raise GridError(
                f"{where}: {dotted!r}: {section} has no field {leaf!r} "
                f"(fields: {', '.join(sorted(node.keys()))})."
            )
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise GridError(f"{where}: {dotted}={value!r}: {e}") from e
    return config


def method_label(decode_config: ml_collections.ConfigDict) -> str:
    """'greedy', 'beam3', 'beam3_lp0.7' or 'sample_t0.7_k5'; '_unblocked' appended when
    `decode.block_repeats` is off."""
    method = decode_config.method
    label = str(method)
    if method == "beam":
        penalty = float(decode_config.length_penalty)
        label = f"beam{decode_config.beam_size}" + (f"_lp{penalty:g}" if penalty else "")
    elif method == "sample":
        label = f"sample_t{decode_config.temperature:g}_k{decode_config.top_k}"
    # As evaluate.report_name names the report files (not imported: it brings JAX).
    return label + ("" if decode_config.block_repeats else "_unblocked")


# ---------------------------------------------------------------------------------------------
# Running cells
# ---------------------------------------------------------------------------------------------


def _save_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _comparable(config: ml_collections.ConfigDict) -> dict:
    """The resolved config that decides whether a recorded cell is still valid."""
    return json.loads(config.to_json())


def _error_text(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first_line}"
    return text if len(text) <= 160 else text[:157] + "..."


def _epochs_trained(run) -> int | None:
    """Epochs in the cell's history.json (None: none written)."""
    if not run.has("history.json"):
        return None
    history = run.read_json("history.json")
    return int(history[-1]["epoch"]) if history else 0


def _row(cell: Cell, label: str, split: str = "-", **fields) -> dict[str, Any]:
    return {"cell": cell.name, "method": label, "split": split, **fields}


def with_seeds(cells: Sequence[Cell], seeds: Sequence[int]) -> list[Cell]:
    """Each cell once per seed: `<name>_seed<k>` with the override seed=k (no seeds: as given)."""
    if not seeds:
        return list(cells)
    return [
        Cell(f"{cell.name}_seed{seed}", {**cell.overrides, "seed": int(seed)}, cell.methods)
        for cell in cells
        for seed in seeds
    ]


def _extra_splits(config: ml_collections.ConfigDict) -> list[str]:
    splits = (s.strip() for s in config.eval.extra_splits.split(","))
    return [s for s in splits if s and s != config.eval.split]


def run_cell(base_config: ml_collections.ConfigDict, cell: Cell, workdir: str) -> list[dict]:
    """Trains one cell and evaluates every method -> one row per method (never raises on a
    training or evaluation error: the row says 'failed: ...')."""
    # JAX, TF: imported when a grid actually runs.
    from captioning.data import prepare as data
    from captioning.evaluation import evaluate
    from captioning.run_dir import RunDir
    from captioning.training import train

    cell_dir = os.path.join(workdir, cell.name)
    run = RunDir(cell_dir)
    where = f"grid cell {cell.name!r}"
    configs = [
        apply_overrides(apply_overrides(base_config, cell.overrides, where), method, where)
        for method in cell.methods
    ]
    labels = [method_label(c.decode) for c in configs]
    record_path = os.path.join(cell_dir, CELL_FILE)
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("configs") == [_comparable(c) for c in configs]:
            logging.info("Grid cell %s: already done (%s), not retrained.", cell.name, record_path)
            return record["rows"]
    os.makedirs(cell_dir, exist_ok=True)

    resumed = run.has_checkpoint("latest")  # An earlier attempt saved one: training resumes.
    rows: list[dict] = []
    try:
        # Export (or find) the feature store before the clock starts; it is shared by cells.
        data.export_store(configs[0], cell_dir)
        start = time.perf_counter()
        report = train.train_and_evaluate(configs[0], cell_dir)
        train_seconds = time.perf_counter() - start
    except Exception as e:  # A broken cell must not end the grid: it is reported in the table.
        logging.exception("Grid cell %s failed during training.", cell.name)
        with open(os.path.join(cell_dir, "error.txt"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        status = f"failed: {_error_text(e)}"
        return [_row(cell, label, status=status) for label in labels]
    # The splits scored besides eval.split that training scored too (e.g. test_perturbed).
    first = evaluate.report_name(configs[0].decode)
    extra = [s for s in _extra_splits(configs[0]) if run.has(f"eval/{s}_{first}.json")]
    common = {
        "epochs": _epochs_trained(run),
        # A resumed cell's clock only saw the rest of its training.
        "train_s": None if resumed else train_seconds,
    }
    status = "ok (resumed)" if resumed else "ok"

    def ok_row(label: str, report: dict) -> dict:
        timing = {**common, "decode_s": report["decode_seconds"]}
        chosen = report.get("checkpoint", {}).get("epoch")
        fields = {**report["metrics"], **timing, "best_epoch": chosen}
        return _row(cell, label, report["split"], **fields, status=status)

    rows.append(ok_row(labels[0], report))
    for split in extra:
        rows.append(ok_row(labels[0], run.read_json(f"eval/{split}_{first}.json")))
    for config, label in zip(configs[1:], labels[1:], strict=True):
        for split in [config.eval.split, *extra]:
            try:
                rows.append(ok_row(label, evaluate.evaluate(config, cell_dir, split=split)))
            except Exception as e:  # Only this method's row fails.
                logging.exception("Grid cell %s: evaluating %s failed.", cell.name, label)
                with open(os.path.join(cell_dir, f"error_{label}.txt"), "w") as f:
                    f.write(traceback.format_exc())
                rows.append(_row(cell, label, split, **common, status=f"failed: {_error_text(e)}"))
    if all(r["status"].startswith("ok") for r in rows):
        _save_json(
            record_path,
            {
                "name": cell.name,
                "overrides": cell.overrides,
                "methods": list(cell.methods),
                "configs": [_comparable(c) for c in configs],
                "rows": rows,
            },
        )
    return rows


def _machine() -> str:
    """Where the timings were measured, for the table."""
    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return (
        f"Measured on {device.platform} ({kind}, {jax.device_count()} device(s)), "
        f"{os.cpu_count()} CPU cores."
    )


def _recorded_rows(cell: Cell, workdir: str) -> list[dict] | None:
    path = os.path.join(workdir, cell.name, CELL_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["rows"]


def run_grid(
    config: ml_collections.ConfigDict,
    cells: Sequence[Cell],
    workdir: str,
    *,
    only: Sequence[str] | None = None,
    header: str = "",
) -> list[dict]:
    """Runs the cells (all, or those named in `only`) and writes workdir/grid.md -> all rows."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    names = [c.name for c in cells]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise GridError(f"--cells names {unknown}, not in the grid ({', '.join(names)}).")
    # Fail on a bad override before hours of training, not when its cell comes up.
    for cell in cells:
        where = f"grid cell {cell.name!r}"
        for method in cell.methods:
            apply_overrides(apply_overrides(config, cell.overrides, where), method, where)
    header = "\n\n".join(x for x in (header, _machine()) if x)
    _save_json(
        os.path.join(workdir, "grid.json"),
        {
            "config": _comparable(config),
            "cells": [dataclasses.asdict(c) for c in cells],
        },
    )
    rows_by_cell: dict[str, list[dict]] = {}
    for cell in cells:
        if only and cell.name not in only:
            recorded = _recorded_rows(cell, workdir)
            if recorded is not None:
                rows_by_cell[cell.name] = recorded
            continue
        logging.info("Grid cell %s: %s", cell.name, cell.overrides)
        rows_by_cell[cell.name] = run_cell(config, cell, workdir)
        write_table(os.path.join(workdir, TABLE_FILE), cells, rows_by_cell, header=header)
    write_table(os.path.join(workdir, TABLE_FILE), cells, rows_by_cell, header=header)
    rows = [row for cell in cells for row in rows_by_cell.get(cell.name, [])]
    summary = summarize_seeds(rows)
    if summary:
        _save_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return rows


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _cell_text(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):  # A mean over seeds.
        digits = 1 if column in ("train_s", "best_epoch") else 4
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    if column in ("train_s", "decode_s"):
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def _override_text(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) or "(base config)"


_SEED_SUFFIX = re.compile(r"^(.*)_seed(\d+)$")


def summarize_seeds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `<cell>_seed<k>` cells grouped by (cell, method, split) -> one row each with every
    numeric column as {"mean", "std" (sample), "min", "max", "values"} and `seeds` (how many).
    Cells without a seed suffix and failed rows are left out."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        match = _SEED_SUFFIX.match(str(row.get("cell", "")))
        if match and str(row.get("status", "")).startswith("ok"):
            groups.setdefault((match.group(1), row["method"], row.get("split", "-")), []).append(
                row
            )
    summary = []
    for (cell, method, split), members in groups.items():
        out: dict[str, Any] = {"cell": cell, "method": method, "split": split}
        out["seeds"] = len(members)
        for column in (*metrics.columns(), "best_epoch", "train_s"):
            values = [float(r[column]) for r in members if r.get(column) is not None]
            if values:
                out[column] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                }
        summary.append(out)
    return summary


def _markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell_text(c, row.get(c)) for c in columns) + " |")
    return lines


def write_table(
    path: str,
    cells: Sequence[Cell],
    rows_by_cell: Mapping[str, list[dict]],
    *,
    header: str = "",
) -> None:
    """One markdown table: a row per (cell, method), metric columns that any row has, epochs,
    train_s, decode_s and status; then the overrides of every cell."""
    rows = []
    for cell in cells:
        if cell.name in rows_by_cell:
            rows += rows_by_cell[cell.name]
        else:
            rows.append({"cell": cell.name, "method": "-", "status": "not run"})
    shown = [m for m in metrics.columns() if any(m in r for r in rows)]
    columns = ["cell", "method", "split", *shown, "best_epoch", "epochs", "train_s", "decode_s"]
    columns.append("status")
    lines = [header.rstrip() + "\n"] if header else []
    summary = summarize_seeds(rows)
    if summary:
        summary_columns = ["cell", "method", "split", "seeds", *shown, "best_epoch", "train_s"]
        lines += ["Mean ± std over seeds:", "", *_markdown(summary_columns, summary), ""]
    lines += _markdown(columns, rows)
    lines += [
        "",
        "train_s: wall-clock seconds of train_and_evaluate (data loading, compilation, training "
        "with per-epoch validation, final evaluation; feature export excluded; '-' when resumed). "
        "decode_s: decoding the evaluation split with that method.",
        "",
        "Cells (overrides of the base config):",
        "",
    ]
    for cell in cells:
        methods = "; ".join(
            "{" + (_override_text(m) if m else "the config's decoding") + "}" for m in cell.methods
        )
        lines.append(f"- **{cell.name}**: {_override_text(cell.overrides)}; methods: {methods}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config file; --config.* overrides apply.")
flags.DEFINE_string("grid", None, "Grid file defining get_grid() (e.g. configs/grids/scenes.py).")
flags.DEFINE_string("workdir", None, "Folder of the grid: one run folder per cell, grid.md.")
flags.DEFINE_list("cells", [], "Run only these cells (comma-separated names); default all.")
flags.DEFINE_list(
    "seeds", [], "Run every cell once per seed (e.g. 0,1,2,3,4) and add mean ± std over seeds."
)


def _quiet_library_logs() -> None:
    """As main.py: drop Orbax and TF info lines, keep warnings."""
    import logging as py_logging

    def keep(record):
        noisy = "/orbax/" in record.pathname or "/tensorflow/" in record.pathname
        return record.levelno >= py_logging.WARNING or not noisy

    logging.get_absl_handler().addFilter(keep)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in ("config", "workdir"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required.")
    if not FLAGS.grid and not FLAGS.seeds:
        raise app.UsageError("Give --grid=configs/grids/<name>.py, --seeds=0,1,2 or both.")
    _quiet_library_logs()
    from captioning import host

    host.keep_freed_memory()  # As main.py does: steps without a page-fault storm (host.py).
    import tensorflow as tf  # Keep TensorFlow (feature export) off any accelerator JAX uses.

    tf.config.set_visible_devices([], "GPU")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError as e:
        raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: give integers, e.g. 0,1,2.") from e
    # Without a grid file: one cell, the config itself.
    cells = load_grid(FLAGS.grid) if FLAGS.grid else [Cell("config", {})]
    cells = with_seeds(cells, seeds)
    header = "`python -m captioning.tools.grid " + " ".join(sys.argv[1:]) + "`"
    rows = run_grid(FLAGS.config, cells, FLAGS.workdir, only=FLAGS.cells, header=header)
    failed = [r for r in rows if not str(r.get("status", "")).startswith("ok")]
    logging.info(
        "Grid done: %d rows, %d not ok -> %s",
        len(rows),
        len(failed),
        os.path.join(os.path.abspath(FLAGS.workdir), TABLE_FILE),
    )


if __name__ == "__main__":
    app.run(main)
