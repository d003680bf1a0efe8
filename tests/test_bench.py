"""The benchmark scripts run end to end at toy sizes (they are not timed here): bench_esd.py's
ESD implementations train the same algorithm, the losses of ours and of two diffusers copies
agreeing, a LoRA starting from the same loss and holding less, and the pool's trajectories are
counted in its memory; bench_app.py erases through the demo and the CLI, alone and beside 6
clients (it needs the demo's packages, which .ci/run installs); bench_evaluate.py times
evaluate.py --prompts with one process and two."""

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

    # A LoRA starts as the full method (B = 0): the same first loss; it holds less than ours
    lora_gap = float(
        re.search(r"LoRA 4: first loss vs ours, relative difference ([0-9.e+-]+)", r.stdout)[1]
    )
    assert lora_gap < 1e-5, r.stdout
    held = dict(
        re.findall(
            r"  (ours|ours, LoRA 4) +[0-9.]+ s/it \([0-9.]+x\) +held +([0-9.]+) MiB", r.stdout
        )
    )
    assert float(held["ours, LoRA 4"]) < float(held["ours"]), r.stdout

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


def test_bench_evaluate_runs_one_and_two_processes():
    tiny_run = ["--images-per-prompt", "1", "--steps", "1", "--rounds", "1"]
    r = subprocess.run(
        [sys.executable, "bench/bench_evaluate.py", *tiny_run],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rates = [float(x) for x in re.findall(r"process\(es\): ([0-9.]+) images/s", r.stdout)]
    assert len(rates) == 2 and min(rates) > 0 and "two processes / one" in r.stdout, r.stdout
