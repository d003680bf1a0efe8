"""Erasure against training time, one line per way of getting x_t, on the shipped toy (ESD-x and
ESD-u).

Each run trains `train.train` from one seed with one torch thread; every --every iterations the
trained tensors are copied aside (the clock stopped), and afterwards each copy is judged by
evaluate.py's protocol (21 prompts x 8 seeds, the toy's classifier): concept alone, in context,
other shapes, colours. Time is the training's own CPU seconds (process time, one thread: other jobs
on the machine inflate it far less than wall time; both are written). Runs go --jobs at a time,
each in a process of its own.

    python bench/erasure_vs_time.py           # every strategy, both methods, seeds 0 and 1 (~1 h)
    python bench/erasure_vs_time.py --report  # table and plot from docs/erasure_vs_time.json

Writes docs/erasure_vs_time.json (every point), prints the table (markdown), draws
docs/erasure_vs_time.png (matplotlib). "Equal erasure" is docs/results.md's rule: alone at most 5
points above the paper path's end, in context at most 10 above, other shapes at most 2 below,
colours at most 2 below.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# the repository root, for the product's modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import delta  # noqa: E402
import esd  # noqa: E402
import evaluate  # noqa: E402
import load_sd  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "erasure_vs_time.json")
METHODS = {
    "esd-x": [],
    "esd-u": ["--method", "esd-u", "--lr", "2e-4", "--negative-guidance", "2", "--batch-size", "8"],
}
# x_t sampled every iteration with the model being trained
PAPER = ["--trajectory-pool", "0"]
# name -> train.py flags (the toy's: 20 DDIM steps); pool N/R: N trajectories per batch row,
# rebuilt every R iterations (train.py's default: pool 4/40)
STRATEGIES = {
    "paper": PAPER,
    "steps 10": [*PAPER, "--steps", "10"],
    "pool 4/20": ["--trajectory-pool", "4", "--pool-refresh", "20"],
    "pool 4/40": ["--trajectory-pool", "4", "--pool-refresh", "40"],
    "pool 2/20": ["--trajectory-pool", "2", "--pool-refresh", "20"],
    "pool 8/80": ["--trajectory-pool", "8", "--pool-refresh", "80"],
    "pool 4/20 steps 10": ["--trajectory-pool", "4", "--pool-refresh", "20", "--steps", "10"],
    "frozen pool 16": ["--trajectory-pool", "16", "--pool-refresh", "0", "--xt-from", "frozen"],
    # bench-only (PathBatch): 4 timesteps of each trajectory per step, a quarter of the iterations
    "path 4": PAPER,
}
# The paper path's length on the toy (its default before x_t pools): the reference
PAPER_ITERATIONS = 300
# Strategies other than the paper train this much longer, to show where they get to
LONGER = 4 / 3
RATES = ("circle_alone", "circle_in_context", "other_shapes", "colors")
# "Equal erasure": the change allowed in each rate
EQUAL = {
    "circle_alone": 0.05,
    "circle_in_context": 0.10,
    "other_shapes": -0.02,
    "colors": -0.02,
}


class PathBatch(esd.PaperXt):
    """Bench-only: each step reads K timesteps of each batch row's trajectory, sampled to the
    deepest of them. The paper's x_t otherwise: train.train(..., xt_source=PathBatch)."""

    k = 4

    def draw(self, it):
        concept_index, _, noise_seed = self.numbers("iteration", it)
        t_encs = sorted(self.numbers(f"path{it}", j)[1] for j in range(self.k))
        t_enc = torch.tensor(t_encs)
        deepest = int(t_enc[-1])
        paths = self.sample(
            [concept_index], [noise_seed], self.batch_size, deepest, trajectory=True
        )
        concept_indices = [concept_index] * self.k * self.batch_size
        return concept_indices, t_enc.repeat_interleave(self.batch_size), paths[t_enc].flatten(0, 1)


def run(method, strategy, seed, every, out, longer=LONGER):
    """One training (in this process): snapshots every `every` iterations, each judged
    afterwards."""
    torch.set_num_threads(1)
    toy = ["--model", "toy", "--concept", "circle", "--seed", str(seed), "--no-eval"]
    output = ["--output", out, "--overwrite"]
    config = train.parse_args([*toy, *output, *METHODS[method], *STRATEGIES[strategy]])

    # The iterations: the paper's, longer for the other strategies
    default = PAPER_ITERATIONS
    config.iterations = PAPER_ITERATIONS
    if strategy != "paper":
        config.iterations = round(config.iterations * longer)

    # "path 4": K x_t per step, a K-th of the iterations: as many x_t
    xt_source = None
    if strategy == "path 4":
        default = default // PathBatch.k
        config.iterations = config.iterations // PathBatch.k
        xt_source = PathBatch

    concepts = train.check(config)
    sd = load_sd.load("toy")
    points = []
    names = list(esd.select(sd.unet, config.method))
    clock = {"cpu": 0.0, "wall": 0.0, "since": (time.process_time(), time.perf_counter())}

    # Training's own time only; every `every` iterations a copy of the trained tensors
    def on_step(iteration, loss):
        cpu, wall = time.process_time(), time.perf_counter()
        clock["cpu"] += cpu - clock["since"][0]
        clock["wall"] += wall - clock["since"][1]
        if iteration % every == 0 or iteration == config.iterations:
            params = dict(sd.unet.named_parameters())
            points.append(
                dict(
                    iteration=iteration,
                    cpu_s=clock["cpu"],
                    wall_s=clock["wall"],
                    tensors={n: params[n].detach().clone() for n in names},
                )
            )
        clock["since"] = (time.process_time(), time.perf_counter())

    train.train(config, sd, concepts, on_step=on_step, xt_source=xt_source)

    # Each snapshot judged afterwards: the edited model's scores
    base = load_sd.load("toy")
    for point in points:
        with delta.applied(base.unet, point.pop("tensors")):
            point.update(evaluate.evaluate(base, None, "circle")["base"])
    return dict(
        method=method,
        strategy=strategy,
        seed=seed,
        default=default,
        config=dataclasses.asdict(config),
        points=points,
    )


def equal_erasure(rates, paper_end):
    return all((rates[k] - paper_end[k]) * (1 if d > 0 else -1) <= abs(d) for k, d in EQUAL.items())


def report(results):
    """Markdown table: per method, strategy and seed, the paper-equal point's time, rates and
    speed-up."""
    rows = [
        "| method | strategy | seed | iterations | CPU s | alone | in context | other shapes "
        "| colours | time to the paper's erasure | speed-up |",
        "|" + "---|" * 11,
    ]
    paper = {(r["method"], r["seed"]): r["points"][-1] for r in results if r["strategy"] == "paper"}
    for r in results:
        end = paper.get((r["method"], r["seed"]))
        hit = next((p for p in r["points"] if end and equal_erasure(p, end)), None)
        # the point at the default length
        last = min(r["points"], key=lambda p: abs(p["iteration"] - r["default"]))
        rates = " | ".join(f"{last[k]:.1%}" for k in RATES)
        reach = f"{hit['cpu_s']:.0f} s ({hit['iteration']} it)" if hit else "not reached"
        speed = f"{end['cpu_s'] / hit['cpu_s']:.2f}x" if hit and end else ""
        run = f"| {r['method']} | {r['strategy']} | {r['seed']} "
        rows.append(
            f"{run}| {last['iteration']} | {last['cpu_s']:.0f} | {rates} | {reach} | {speed} |"
        )
    return "\n".join(rows)


def plot(results, path, strategies=None):
    """Per method: alone, in context and other shapes against training CPU seconds, a line per
    strategy (mean of the seeds, point by point)."""
    import matplotlib  # bench-only: pip install matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in results})
    keys = ("circle_alone", "circle_in_context", "other_shapes")
    figsize = (5 * len(keys), 4 * len(methods))
    fig, axes = plt.subplots(len(methods), len(keys), figsize=figsize, squeeze=False)
    for row, method in enumerate(methods):
        for i, strategy in enumerate(strategies or STRATEGIES):
            runs = [
                r["points"] for r in results if (r["method"], r["strategy"]) == (method, strategy)
            ]
            if not runs:
                continue

            # the mean of the seeds, point by point
            n = min(len(points) for points in runs)
            mean = {
                k: [sum(points[j][k] for points in runs) / len(runs) for j in range(n)]
                for k in (*keys, "cpu_s")
            }

            # the paper's line drawn bold
            style = "o-" if strategy == "paper" else ".-"
            width = 2.5 if strategy == "paper" else 1.2
            for col, key in enumerate(keys):
                axes[row][col].plot(
                    mean["cpu_s"], mean[key], style, ms=4, color=f"C{i}", lw=width, label=strategy
                )
        for col, key in enumerate(keys):
            axes[row][col].set(
                title=f"{method}: {key.replace('_', ' ')}",
                xlabel="training CPU seconds (one thread)",
                ylabel="share of images",
                ylim=(0.7, 1) if key == "other_shapes" else (0, 1),
            )
            axes[row][col].grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    n_seeds = len({r["seed"] for r in results})
    fig.suptitle(
        f"ESD on the toy: erasure against training time (mean of {n_seeds} seeds, "
        "evaluate.py's protocol)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--every", type=int, default=50, help="snapshot every N iterations")
    longer = "strategies but the paper train this much longer"
    p.add_argument("--longer", type=float, default=LONGER, help=longer)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    report_only = "only the table and plot from the saved results"
    p.add_argument("--report", action="store_true", help=report_only)
    p.add_argument("--again", action="store_true", help="rerun runs already in the saved results")
    p.add_argument("--one", nargs=3, metavar=("METHOD", "STRATEGY", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    # A worker: one run, its result as JSON on stdout's last line
    if args.one:
        method, strategy, seed = args.one
        tmp = os.environ.get("TMPDIR", "/tmp")
        out = os.path.join(tmp, f"erasure-vs-time-{os.getpid()}.safetensors")
        print(json.dumps(run(method, strategy, int(seed), args.every, out, args.longer)))
        return

    # The runs not in the saved results yet (an interrupted benchmark goes on), --jobs at a time
    results = json.load(open(RESULTS)) if os.path.exists(RESULTS) else []
    if not args.report:
        done = {(r["method"], r["strategy"], r["seed"]) for r in results}
        todo = [
            (m, s, seed)
            for m in args.methods
            for s in args.strategies
            for seed in args.seeds
            if args.again or (m, s, seed) not in done
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")

        def work(job):
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                job[0],
                job[1],
                str(job[2]),
                "--every",
                str(args.every),
                "--longer",
                str(args.longer),
            ]
            worker = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            print(f"done {job}", file=sys.stderr, flush=True)
            return json.loads(worker.stdout.strip().splitlines()[-1])

        with ThreadPoolExecutor(args.jobs) as pool:
            for result in pool.map(work, todo):
                key = (result["method"], result["strategy"], result["seed"])
                results = [r for r in results if (r["method"], r["strategy"], r["seed"]) != key]
                results.append(result)
                with open(RESULTS + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(RESULTS + ".tmp", RESULTS)

    # The table and the plot, strategies in STRATEGIES' order
    order = {s: i for i, s in enumerate(STRATEGIES)}
    results.sort(key=lambda r: (r["method"], order.get(r["strategy"], 99), r["seed"]))
    print(report(results))
    plot(results, RESULTS.replace(".json", ".png"))


if __name__ == "__main__":
    main()
