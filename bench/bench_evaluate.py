"""Throughput of evaluate.py --prompts: images per second for one process and for two (torchrun on
gloo on a CPU, NCCL on GPUs), the whole command timed (start-up included), in turns, into fresh
folders; and the ratio. One thread per process: on a small shared CPU, threads fighting over the
cores make one process with two threads slower than one with one.

    python bench/bench_evaluate.py [--images-per-prompt 8] [--steps 20] [--rounds 2] [--device cpu]
        [--model toy] [--prompts assets/toy_prompts.csv]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import protocol  # noqa: E402

TOY_CSV = os.path.join(ROOT, "assets", "toy_prompts.csv")


def timed(processes, args, folder):
    """Seconds of one evaluate.py command with `processes` processes."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command = [*launcher, os.path.join(ROOT, "evaluate.py"), *args, "--output-dir", folder]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"evaluate.py failed: {done.stderr[-2000:]}")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images-per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="toy")
    p.add_argument("--prompts", default=TOY_CSV)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    flags = ["--model", args.model, "--prompts", args.prompts]
    flags += ["--images-per-prompt", str(args.images_per_prompt)]
    flags += ["--steps", str(args.steps), "--device", args.device]
    images = len(protocol.read_prompts(args.prompts)) * args.images_per_prompt

    # In turns: one process, then two, each round into fresh folders.
    seconds = {1: [], 2: []}
    work = tempfile.mkdtemp()
    try:
        for turn in range(args.rounds):
            for processes in seconds:
                folder = os.path.join(work, f"{processes}-{turn}")
                seconds[processes].append(timed(processes, flags, folder))
    finally:
        shutil.rmtree(work)

    rate = {n: images / min(s) for n, s in seconds.items()}
    print(f"{args.model}, {images} images at {args.steps} DDIM steps, {cores} cores, {args.device}")
    for n in seconds:
        print(f"{n} process(es): {rate[n]:.2f} images/s (best of {args.rounds}, start-up included)")
    print(f"two processes / one: {rate[2] / rate[1]:.2f}x the images per second")


if __name__ == "__main__":
    main()
