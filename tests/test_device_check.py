"""captioning.tools.device_check: its parsers, a step that fails or runs out of time, and the
whole check with stand-in commands (JAX's real device list, so here it says there is no
accelerator)."""

import dataclasses
import json
import sys
import textwrap

import jax
import pytest

from captioning.tools import device_check

PYTEST_OUTPUT = """\
..s.F
=========================== short test summary info ============================
SKIPPED [2] tests/test_accelerator.py: needs a GPU or TPU (jax.default_backend() is cpu)
FAILED tests/test_losses.py::test_x - AssertionError
1 failed, 3 passed, 2 skipped, 313 deselected in 5.10s
"""


def test_pytest_figures_count_failures_and_skip_reasons():
    figures = device_check.pytest_figures(PYTEST_OUTPUT)
    assert (figures["failed"], figures["passed"], figures["skipped"]) == (1, 3, 2)
    assert figures["failed_tests"] == ["tests/test_losses.py::test_x"]
    assert figures["skip_reasons"] == [
        "tests/test_accelerator.py: needs a GPU or TPU (jax.default_backend() is cpu)"
    ]
    assert device_check.pytest_figures("crashed before collecting")["failed_tests"] == []


def test_last_json_takes_the_last_object_after_log_lines():
    output = 'I0101 log {"not": json\n{"a": 1}\nmore log\n{\n "b": [1,\n  2]\n}\n'
    assert device_check.last_json(output) == {"b": [1, 2]}
    with pytest.raises(ValueError, match="no JSON"):
        device_check.last_json("no figures here")


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code))


def test_a_failing_step_and_a_step_out_of_time_are_recorded():
    failing = device_check.Step(
        "fails", _python("print('x' * 5000); raise SystemExit(3)"), 30, device_check.last_json
    )
    record = device_check.run_step(failing, 30)
    assert (record["returncode"], record["timed_out"]) == (3, False)
    assert record["figures"]["parse_error"].startswith("ValueError")
    assert len(record["tail"]) == device_check.TAIL_CHARS and record["tail"].startswith("x")
    slow = device_check.Step("slow", _python("import time; print('started'); time.sleep(60)"), 1)
    record = device_check.run_step(slow, 1)
    assert record["timed_out"] and record["returncode"] is None and record["seconds"] < 30
    assert "started" in record["tail"]


FAKE_FIRST_COMMAND = """
import json, os, sys
run = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
os.makedirs(os.path.join(run, "eval"))
report = {"metrics": {"CIDEr": 1.5, "attribute_accuracy": 0.5}, "checkpoint": {"epoch": 1}}
with open(os.path.join(run, "eval", "test_greedy.json"), "w") as f:
    json.dump(report, f)
print("Compiled 2 train and 2 eval steps in 3.5s (bucket lengths [8, 24]).")
print("Epoch 1/1 (step 3) in 2.0s (train 1.5s, validation 0.5s): train_loss 3.2")
"""
BENCHMARK_OUTPUT = "import json; print(json.dumps({'train_targets_per_s': 9.5}, indent=1))"


def test_the_check_writes_every_step_and_says_there_is_no_accelerator(tmp_path):
    """The real device listing; stand-ins for the long steps (their output as the real ones
    print it); a peer that is not there."""
    steps = device_check.plan(str(tmp_path), True, "absent/peer.py", "absent")
    assert [s.name for s in steps][:5] == [
        "devices", "accelerator", "tests", "first_command", "benchmark"
    ]  # fmt: skip
    assert "--config=configs/scenes_transformer.py" in steps[3].command
    assert "--config.train.num_epochs=1" in steps[3].command
    fakes = {
        "accelerator": _python(f"print({PYTEST_OUTPUT!r})"),
        "tests": _python("print('41 passed in 54.60s')"),
        "first_command": (*_python(FAKE_FIRST_COMMAND), *steps[3].command[2:]),
        "benchmark": _python(BENCHMARK_OUTPUT),
    }
    plan = [dataclasses.replace(s, command=fakes.get(s.name, s.command)) for s in steps]
    out = tmp_path / "check.json"
    lines = []
    report = device_check.check(plan, 120, str(out), log=lines.append)

    assert json.loads(out.read_text()) == report
    if jax.default_backend() == "cpu":
        assert report["statement"] == "no accelerator found: running on cpu"
        assert not report["accelerator"] and device_check.NO_ACCELERATOR in lines
    else:
        assert report["statement"].startswith("accelerator found") and report["accelerator"]
    assert report["devices"]["backend"] == jax.default_backend()
    assert len(report["devices"]["devices"]) == jax.device_count()
    steps = {s["name"]: s for s in report["steps"]}
    assert all(steps[n]["returncode"] == 0 for n in fakes), steps
    assert steps["accelerator"]["figures"]["skipped"] == 2
    assert steps["tests"]["figures"]["passed"] == 41
    first = steps["first_command"]["figures"]
    assert first["test_metrics"]["CIDEr"] == 1.5 and first["chosen_epoch"] == 1
    assert (first["compile_s"], first["epoch_s"], first["epoch_train_s"]) == (3.5, [2.0], [1.5])
    assert steps["benchmark"]["figures"] == {"train_targets_per_s": 9.5}
    assert "missing" in steps["torch_peer"]["skipped"]
    assert all(isinstance(s.get("seconds", 0.0), float) for s in report["steps"])

    spent = device_check.check(plan[1:], 0, str(out), log=lines.append)
    assert {s["skipped"] for s in spent["steps"]} >= {"the budget is spent"}
    assert "returncode" not in spent["steps"][0]
