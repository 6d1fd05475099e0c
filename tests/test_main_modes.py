"""`main.py --mode=serve` and `--mode=export_features` run as a user runs them (subprocesses)."""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import httpx
from conftest import REPO, make_run_dir

from configs import test as test_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_export_features_mode_writes_a_complete_store(tmp_path):
    cache = tmp_path / "cache"
    command = [
        sys.executable, "main.py", "--mode=export_features", "--config=configs/test.py",
        f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={cache}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (metadata,) = glob.glob(str(cache / "features" / "*" / "*" / "metadata.json"))
    with open(metadata) as f:
        store = json.load(f)
    assert store["complete"] and store["num_images"] > 0
    assert glob.glob(os.path.join(os.path.dirname(metadata), "shard_*.npz"))


def test_serve_mode_answers_on_its_port_and_stops(tmp_path):
    config = test_config.get_config()
    workdir = make_run_dir(tmp_path / "run", config, ["red", "blue", "circle", "square"])
    port = _free_port()
    command = [
        sys.executable, "main.py", "--mode=serve", f"--workdir={workdir}", f"--port={port}",
    ]  # fmt: skip
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the demo did not open its port in 5 minutes"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=60)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode is not None
