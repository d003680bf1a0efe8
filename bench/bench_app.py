"""The demo's speed targets, measured in one run: the default erase of "circle" on the toy through
app.py (gradio_client: from pressing Train to Done, the page's updates timed on the way) against the
whole `python train.py --model toy --concept circle --no-eval` command, taken in turns; then Compare
with three prompts and a delta. Both run as a user starts them (train.py with torch's own thread
count, the app with one). Prints each round and the ratios; the targets (issue 12): app <= CLI +
10%, an update at least every 2 s, Compare <= 5 s.

The limits (issue 25): Compare with 8 prompts and a delta at the most steps the default
--max-sampling-steps allows, and Measure at the most seeds, each alone (target: under 10 s). The
busy case: the same erase alone, then again while 6 clients each run Compare (the page's defaults
and the delta) and Measure (the page's default seeds) in turns until it ends: the Compare and
Measure latencies (median, max) and the erase's time against its time alone.

    pip install -r requirements-app.txt && python bench/bench_app.py [--rounds 3] [--iterations N]
    python bench/bench_app.py --busy-only  # the limits and the busy case alone
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from gradio_client import Client, handle_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import app  # noqa: E402
import toy  # noqa: E402

PROMPTS = "a circle\na red circle\na blue square"
EIGHT = "\n".join(["a circle", "a red circle", "a blue square", "a green triangle"] * 2)
CLIENTS = 6
# The toy's default limit, and the most seeds (each 2 x 20 steps) Measure may take under it: the
# page's default.
BUDGET = app.LIMITS["toy"]["max_sampling_steps"]
SEEDS = BUDGET // (2 * toy.DDIM_STEPS)


def serve(work):
    """`python app.py` on a free port in the folder `work`, once it answers: (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "app.py"), "--port", str(port)],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return proc, url
        except OSError:
            assert proc.poll() is None, "app.py exited"
            time.sleep(0.5)


def erase_in_app(client, iterations):
    """Seconds from Train to Done, the gaps between the page's updates, the delta."""
    started = time.monotonic()
    job = client.submit(
        "circle", "esd-x", 1.0, iterations, toy.ESD["lr"], "trained", 0, api_name="/erase"
    )
    arrivals = [time.monotonic() for _ in job]
    final = job.outputs()[-1]
    assert final[0].startswith("Done"), final[0]
    return time.monotonic() - started, np.diff([started, *arrivals]), final[3]


def erase_in_cli(work, iterations, i):
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--model",
            "toy",
            "--concept",
            "circle",
            "--no-eval",
            "--iterations",
            str(iterations),
            "--output",
            os.path.join(work, f"cli-{i}.safetensors"),
        ],
        check=True,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def compare(client, edit):
    """Seconds for Compare with three prompts and the delta `edit`."""
    started = time.monotonic()
    settings = (PROMPTS, 0, toy.DDIM_STEPS, toy.GUIDANCE, handle_file(edit))
    client.predict(*settings, api_name="/compare")
    return time.monotonic() - started


def at_the_limits(client, edit):
    """Seconds for Compare with 8 prompts and the delta at the most steps the toy's default limit
    allows, and for Measure at the most seeds."""
    started = time.monotonic()
    client.predict(EIGHT, 0, BUDGET // 2, toy.GUIDANCE, handle_file(edit), api_name="/compare")
    compare_s = time.monotonic() - started
    started = time.monotonic()
    client.predict(handle_file(edit), "", "", SEEDS, api_name="/measure")
    return compare_s, time.monotonic() - started


def busy(url, iterations, edit):
    """The erase alone, then beside CLIENTS clients' Compare and Measure: (erase alone, erase busy,
    Compare latencies, Measure latencies), in seconds."""
    alone = erase_in_app(Client(url, verbose=False), iterations)[0]
    compares = []
    measures = []
    training = threading.Event()

    # Each client: Compare, then Measure (the page's default seeds), until the erase ends.
    def person():
        client = Client(url, verbose=False)
        while not training.is_set():
            compares.append(compare(client, edit))
            started = time.monotonic()
            client.predict(handle_file(edit), "", "", SEEDS, api_name="/measure")
            measures.append(time.monotonic() - started)

    people = [threading.Thread(target=person) for _ in range(CLIENTS)]
    for thread in people:
        thread.start()
    with_others = erase_in_app(Client(url, verbose=False), iterations)[0]
    training.set()
    for thread in people:
        thread.join()
    return alone, with_others, compares, measures


def main(argv=None):
    p = argparse.ArgumentParser(
        description="app.py against train.py: the default toy erase, and Compare."
    )
    p.add_argument("--rounds", type=int, default=3, help="erases in each, taken in turns")
    p.add_argument(
        "--iterations", type=int, default=toy.ESD["iterations"], help="(default: the toy's)"
    )
    p.add_argument("--busy-only", action="store_true", help="only the busy case")
    args = p.parse_args(argv)
    rounds = 0 if args.busy_only else args.rounds
    with tempfile.TemporaryDirectory() as work:
        proc, url = serve(work)
        try:
            client = Client(url, verbose=False)
            app_s = []
            cli_s = []
            gaps = []

            # The erase, in turns: train.py, then the app.
            for i in range(rounds):
                cli_s.append(erase_in_cli(work, args.iterations, i))
                seconds, round_gaps, edit = erase_in_app(client, args.iterations)
                app_s.append(seconds)
                # While training: the first gap waits for the start, the last for the save.
                gaps.extend(round_gaps[1:-1])
                ratio = seconds / cli_s[-1]
                print(
                    f"round {i}: app {seconds:.1f} s, train.py {cli_s[-1]:.1f} s, "
                    f"ratio {ratio:.2f}, updates every {np.median(round_gaps):.2f} s "
                    f"(longest {round_gaps.max():.2f})",
                    flush=True,
                )

            # Compare: three prompts and the last delta.
            if not rounds:
                edit = erase_in_app(client, args.iterations)[2]
            compare_s = [compare(client, edit) for _ in range(3)]
            limits_s = at_the_limits(client, edit)

            # The busy case.
            alone, with_others, compares, measures = busy(url, args.iterations, edit)
        finally:
            proc.terminate()
            proc.wait()
    print(
        f"at the limits, alone: Compare of 8 prompts and a delta {limits_s[0]:.1f} s, Measure "
        f"{limits_s[1]:.1f} s (target < 10)"
    )
    print(
        f"busy: the erase took {with_others:.1f} s beside {CLIENTS} clients' Compare and Measure, "
        f"{with_others / alone:.2f}x its {alone:.1f} s alone; Compare (3 prompts and a delta) "
        f"median {np.median(compares):.1f} s, max {max(compares):.1f} s over {len(compares)}; "
        f"Measure ({SEEDS} seeds) median {np.median(measures):.1f} s, max {max(measures):.1f} s "
        f"over {len(measures)}"
    )
    if not rounds:
        return
    ratio = sum(app_s) / sum(cli_s)
    print(
        f"erase: app / train.py = {ratio:.2f} over {args.rounds} rounds (target <= 1.10); "
        f"longest gap between updates {max(gaps, default=0):.2f} s (target <= 2); "
        f"Compare, 3 prompts and a delta: {min(compare_s):.2f}-{max(compare_s):.2f} s "
        "(target <= 5)"
    )


if __name__ == "__main__":
    main()
