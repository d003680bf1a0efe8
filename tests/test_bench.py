"""The benchmark scripts run end to end at toy sizes (they are not timed here): bench_esd.py's three
ESD implementations train the same algorithm, the losses of ours and of two diffusers copies
agreeing, and the pool's trajectories are counted in its memory; bench_app.py erases through the
demo and the CLI, alone and beside 6 clients (it needs the demo's packages, which .ci/run
installs)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_esd_runs_and_ours_equals_two_copies():
    toy = ["--iters", "3", "--pool", "2", "--refresh", "2", "--steps", "3", "--latent", "8"]
    r = subprocess.run(
        [sys.executable, "bench/bench_esd.py", *toy, "--methods", "esd-x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert all(v in r.stdout for v in ("two copies (diffusers)", "ours ", "ours, pool")), r.stdout
    gap = float(re.search(r"max relative difference ([0-9.e+-]+)", r.stdout)[1])
    assert gap < 1e-4, r.stdout

    # The pool's trajectories are counted in its memory: at least their noise, 2 x [4, 8, 8] float32
    pool_kib = float(re.search(r"of which pool ([0-9.]+) KiB", r.stdout)[1])
    assert pool_kib >= 2 * 4 * 8 * 8 * 4 / 2**10, r.stdout


def test_bench_app_runs_and_prints_the_targets():
    if os.environ.get("CI") != "true":
        pytest.importorskip(
            "gradio_client", reason="the demo's packages: pip install -r requirements-app.txt"
        )
    r = subprocess.run(
        [sys.executable, "bench/bench_app.py", "--rounds", "1", "--iterations", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    ratio = float(re.search(r"app / train.py = ([0-9.]+)", r.stdout)[1])
    assert 0 < ratio and "Compare, 3 prompts and a delta" in r.stdout, r.stdout
    busy = float(re.search(r"Compare and Measure, ([0-9.]+)x its", r.stdout)[1])
    assert 0 < busy, r.stdout
