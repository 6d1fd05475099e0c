"""Device check: what this codebase does on this machine's accelerator, in one JSON file.

    python -m captioning.tools.device_check --out=device_check.json [--budget_s=540] [--quick]

Installs nothing. Prints JAX's devices (and says plainly when there is no accelerator), then runs
each step in a subprocess with a time limit, recording its command, return code, seconds, figures
and the tail of its output even when it fails or runs out of time:

  devices         JAX's backend, version and devices
  accelerator     python -m pytest -m accelerator tests (the tests only a GPU/TPU runs)
  tests           a short selection of the suite (TEST_FILES)
  first_command   the README's first command (configs/scenes_transformer.py, fresh cache), timed;
                  its test metrics from <workdir>/eval/test_greedy.json and its epoch times
  benchmark       python -m captioning.tools.benchmark with short timings
  torch, torch_peer  --peer (../shared/peers/torch_merge.py --device=cuda --sorted
                  --decode_words=32), only when torch imports and sees a CUDA device

The steps share --budget_s: each gets the shorter of its own limit and what is left. --quick
shrinks every step (one short epoch of fewer scenes, a 2-second benchmark) so that the whole check
shows itself end to end on a CPU in a few minutes. The JSON is rewritten after every step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "JSON file to write.")
flags.DEFINE_float("budget_s", 540.0, "Seconds for all steps together.")
flags.DEFINE_bool("quick", False, "Small, short steps: the check end to end on a CPU.")
flags.DEFINE_string("peer", "../shared/peers/torch_merge.py", "The PyTorch peer (repo-relative).")
flags.DEFINE_string("peer_data", "../shared/data/flickr8k_text", "The peer's --data folder.")

REPO = Path(__file__).resolve().parents[2]
NO_ACCELERATOR = "no accelerator found: running on cpu"
TEST_FILES = ("tests/test_train_step.py", "tests/test_models.py", "tests/test_losses.py")
QUICK_TEST_FILES = ("tests/test_losses.py",)
TAIL_CHARS = 4000
PYTEST = (sys.executable, "-m", "pytest", "-q", "-n", "0", "-rs", "-p", "no:cacheprovider")

DEVICES_SCRIPT = """import json, jax
print(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "devices": [
    {"platform": d.platform, "kind": d.device_kind, "id": d.id} for d in jax.devices()]}))"""
TORCH_SCRIPT = """import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if cuda else None}))"""
# The README's first command; --quick adds the overrides after it.
FIRST_COMMAND = (sys.executable, "main.py", "--config=configs/scenes_transformer.py")
QUICK_FIRST = (
    "--config.train.num_epochs=1",
    "--config.data.num_train=300",
    "--config.data.num_val=30",
    "--config.data.num_test=30",
    "--config.eval.num_samples=4",
)
BENCHMARK = (sys.executable, "-m", "captioning.tools.benchmark")
FULL_BENCH = (
    "--train_seconds=10",
    "--spatial_seconds=10",
    "--scst_seconds=5",
    "--export_images=64",
)
QUICK_BENCH = (
    "--train_seconds=2",
    "--batch_size=128",
    "--num_buckets=2",
    "--spatial_seconds=0",
    "--scst_seconds=0",
    "--decode_images=64",
    "--export_images=0",
)


@dataclasses.dataclass(frozen=True)
class Step:
    """One command: `parse(output)` gives its figures; `skip(done)` a reason not to run it, from
    the earlier steps' records ({name: record}), or None."""

    name: str
    command: tuple[str, ...]
    limit_s: float
    parse: Callable[[str], dict] = lambda output: {}
    skip: Callable[[dict], str | None] = lambda done: None


def last_json(output: str) -> dict:
    """The last JSON object in `output` that starts a line (one line or indented over many)."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"^\{", output, re.MULTILINE)]
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(output[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("no JSON object in the output")


def pytest_figures(output: str) -> dict:
    """Counts of pytest's last summary line, the failed tests and every skip's reason."""
    summaries = re.findall(r"^=*\s*(\d+ \w+.*) in [\d.]+s", output, re.MULTILINE)
    counts = {w: int(n) for n, w in re.findall(r"(\d+) (\w+)", summaries[-1])} if summaries else {}
    return {
        **counts,
        "failed_tests": re.findall(r"^FAILED (\S+)", output, re.MULTILINE),
        "skip_reasons": re.findall(r"^SKIPPED \[\d+\] (.*)$", output, re.MULTILINE),
    }


def first_command_figures(workdir: str, output: str) -> dict:
    """The test split's metrics, the compile time and each epoch's (seconds, training seconds)."""
    with open(os.path.join(workdir, "eval", "test_greedy.json"), encoding="utf-8") as f:
        report = json.load(f)
    compiled = re.findall(r"Compiled \d+ train and \d+ eval steps in ([\d.]+)s", output)
    epochs = re.findall(r"Epoch \d+/\d+ \(step \d+\) in ([\d.]+)s \(train ([\d.]+)s", output)
    return {
        "test_metrics": report["metrics"],
        "chosen_epoch": report["checkpoint"]["epoch"],
        "compile_s": float(compiled[-1]) if compiled else None,
        "epoch_s": [float(e) for e, _ in epochs],
        "epoch_train_s": [float(t) for _, t in epochs],
    }


def _no_cuda(done: dict) -> str | None:
    if "torch" not in done:
        return "torch is not installed"
    figures = done["torch"].get("figures", {})
    return None if figures.get("device") else "torch sees no CUDA device"


def plan(workdir: str, quick: bool, peer: str, peer_data: str) -> list[Step]:
    """The steps in order, with their commands and own time limits."""
    run = os.path.join(workdir, "run")
    first = (*FIRST_COMMAND, f"--workdir={run}", f"--config.data.cache_dir={workdir}/cache")
    steps = [
        Step("devices", (sys.executable, "-c", DEVICES_SCRIPT), 90, last_json),
        Step("accelerator", (*PYTEST, "-m", "accelerator", "tests"), 150, pytest_figures),
        Step("tests", (*PYTEST, *(QUICK_TEST_FILES if quick else TEST_FILES)), 150, pytest_figures),
        Step(
            "first_command",
            first + (QUICK_FIRST if quick else ()),
            240 if quick else 300,
            lambda output: first_command_figures(run, output),
        ),
        Step("benchmark", (*BENCHMARK, *(QUICK_BENCH if quick else FULL_BENCH)), 240, last_json),
    ]
    if importlib.util.find_spec("torch") is not None:
        steps.append(Step("torch", (sys.executable, "-c", TORCH_SCRIPT), 60, last_json))
    peer_command = (sys.executable, peer, f"--data={peer_data}", "--device=cuda", "--sorted")
    missing = not (REPO / peer).is_file() or not (REPO / peer_data).is_dir()
    steps.append(
        Step(
            "torch_peer",
            (*peer_command, "--decode_words=32"),
            150,
            last_json,
            lambda done: f"{peer} or {peer_data} is missing" if missing else _no_cuda(done),
        )
    )
    return steps


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_step(step: Step, limit_s: float) -> dict:
    """Runs the step's command in the repository (its own process group, killed whole at the
    limit); its output (stdout and stderr together) gives the figures and the tail."""
    record = {"name": step.name, "command": " ".join(step.command), "limit_s": round(limit_s)}
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        step.command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=limit_s)
        record.update(returncode=process.returncode, timed_out=False)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        record.update(returncode=None, timed_out=True)
    output = _text(output)
    record["seconds"] = round(time.perf_counter() - start, 1)
    try:
        record["figures"] = step.parse(output)
    except Exception as e:  # A failed step's output often has no figures: say why, go on.
        record["figures"] = {"parse_error": f"{type(e).__name__}: {e}"}
    record["tail"] = output[-TAIL_CHARS:]
    return record


def statement(devices: dict) -> str:
    """One line on what JAX found."""
    if devices.get("backend") == "cpu":
        return NO_ACCELERATOR
    if not devices.get("devices"):
        return "JAX did not start: see the devices step"
    kinds = sorted({f"{d['kind']} ({d['platform']})" for d in devices["devices"]})
    return f"accelerator found: {len(devices['devices'])} x {', '.join(kinds)}"


def check(steps: list[Step], budget_s: float, out: str, log=print) -> dict:
    """Runs the steps in order within the budget, rewriting `out` after each; returns the
    report."""
    start = time.perf_counter()
    report = {"devices": {}, "accelerator": False, "statement": "", "steps": []}
    done = {}
    for step in steps:
        left = budget_s - (time.perf_counter() - start)
        reason = step.skip(done) or (None if left >= 10 else "the budget is spent")
        if reason:
            record = {"name": step.name, "command": " ".join(step.command), "skipped": reason}
            log(f"{step.name}: skipped ({reason})")
        else:
            record = run_step(step, min(step.limit_s, left))
            state = "timed out" if record["timed_out"] else f"rc {record['returncode']}"
            log(f"{step.name}: {state} in {record['seconds']}s")
        report["steps"].append(record)
        done[step.name] = record
        if step.name == "devices":
            report["devices"] = record.get("figures", {})
            report["statement"] = statement(report["devices"])
            report["accelerator"] = report["devices"].get("backend") in ("gpu", "tpu")
            log(json.dumps(report["devices"]))
            log(report["statement"])
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        Path(out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def main(argv):
    del argv
    workdir = tempfile.mkdtemp(prefix="device_check_")
    try:
        steps = plan(workdir, FLAGS.quick, FLAGS.peer, FLAGS.peer_data)
        report = check(steps, FLAGS.budget_s, os.path.abspath(FLAGS.out))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{report['statement']}; {report['total_seconds']}s in all; wrote {FLAGS.out}")


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    app.run(main)
