"""evaluate.py: how much of a concept an ESD delta erased, and what else it changed.

One protocol for the base model and the edited one (base + delta): the same prompts and seeds'
noise, DDIM with CFG. On the toy a CNN judges every image: the erased-concept rate for the concept
alone ("circle", "a circle") and in context ("a red circle", ...), as ESD (Gandikota et al. arXiv
2303.07345, sec. 4) contrasts ESD-x with ESD-u, plus the other shapes' and colors' accuracy. Any
model: --prompts FILE.csv runs the papers' protocols instead (protocol.py, metrics.py).

    python evaluate.py --model toy --delta esd-x-circle.safetensors --concept circle
    python evaluate.py --model toy --delta esd-x-circle.safetensors \
        --prompts assets/toy_prompts.csv --output-dir eval --metrics classifier
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import cli
import delta
import files
import metrics
import protocol
import sample
import sampler
import toy


# The zero-shot judge for real models, used only if cached locally.
def toy_prompts(concept):
    """[(prompt, group, shape, color)]: the concept alone and in context, then every other shape."""
    if concept not in toy.SHAPES:
        raise ValueError(f"the toy concept must be one of {', '.join(toy.SHAPES)}, got {concept!r}")
    alone = [(p, "alone", concept, None) for p in (concept, f"a {concept}")]
    context = [(f"a {c} {concept}", "context", concept, c) for c in toy.COLORS]
    others = [
        (p, "other", s, c)
        for s in toy.SHAPES
        if s != concept
        for p, c in [(f"a {s}", None)] + [(f"a {c} {s}", c) for c in toy.COLORS]
    ]
    return alone + context + others


def toy_scores(shape_pred, color_pred, entries, concept):
    """Shares of images (seed-major): concept shown alone / in context; other shapes right; colors
    right where asked."""
    n = len(shape_pred) // len(entries)
    group = [e[1] for e in entries] * n
    hit = shape_pred == torch.tensor([list(toy.SHAPES).index(e[2]) for e in entries] * n)
    color = torch.tensor([list(toy.COLORS).index(e[3]) if e[3] else -1 for e in entries] * n)
    share = lambda g: hit[[x == g for x in group]].float().mean().item()  # noqa: E731
    return {
        f"{concept}_alone": share("alone"),
        f"{concept}_in_context": share("context"),
        "other_shapes": share("other"),
        "colors": (color_pred == color)[color >= 0].float().mean().item(),
    }


def clip_scores(images, labels, name=metrics.CLIP_MODEL):
    """Share of images whose best CLIP label is labels[0], and its mean probability; None without
    a local CLIP."""
    clip = metrics.load_clip(name, what="CLIP zero-shot scores")
    if clip is None:
        return None
    model, proc = clip
    inputs = proc(text=labels, images=sample.to_pil(images), return_tensors="pt", padding=True)
    # No grad: evaluate() runs under torch.no_grad.
    probs = model(**inputs).logits_per_image.softmax(-1)
    return {
        "concept_top1": (probs.argmax(-1) == 0).float().mean().item(),
        "concept_prob": probs[:, 0].mean().item(),
    }


@torch.no_grad()
def evaluate(
    sd,
    edit=None,
    concept="circle",
    *,
    prompts=None,
    seeds=range(8),
    steps=None,
    guidance=None,
    classifier=None,
    labels=None,
    grid=None,
    scale=1.0,
):
    """{"base": scores, "edited": scores with delta `edit` (a file or {name: tensor}) applied at
    strength `scale` (delta.weights), "edited/base"}: toy scores if `prompts` is None, else CLIP's
    for `prompts` over `labels` (labels[0]: the concept). grid: a PNG path."""
    is_toy = prompts is None
    seeds = list(seeds)

    # One protocol for both runs: the toy's sampling, or sample.py's at the model's size.
    if is_toy:
        sampling = dict(toy.SAMPLING)
    else:
        size = sd.image_size
        sampling = dict(steps=sample.DDIM_STEPS, guidance=sample.GUIDANCE, height=size, width=size)
    given = dict(steps=steps, guidance=guidance)
    sampling.update({k: v for k, v in given.items() if v is not None})
    if is_toy:
        entries = toy_prompts(concept)
    else:
        entries = [(p, "prompt", None, None) for p in prompts]
    result = {
        "concept": concept,
        "prompts": [e[0] for e in entries],
        "seeds": seeds,
        "steps": sampling["steps"],
        "guidance": sampling["guidance"],
    }

    # The same prompts and seeds through the base weights, then the edited; a seed per batch.
    images = {}
    for run in ("base", "edited") if edit is not None else ("base",):
        edits = [edit] if run == "edited" else []
        # The base weights back afterwards.
        with delta.applied(sd.unet, *edits, scale=scale):
            images[run] = sampler.generate(sd, result["prompts"], seeds, **sampling)
        if is_toy:
            result[run] = toy_scores(*toy.classify(images[run], classifier), entries, concept)
        else:
            result[run] = clip_scores(images[run], labels or [concept, "a photo"])

    if edit is not None and result["base"]:
        result["edited/base"] = {
            k: v / max(result["base"][k], 1e-9) for k, v in result["edited"].items()
        }
    if grid:
        save_grid(images, result["prompts"], grid)
    return result


def save_grid(images, titles, path, seeds_shown=2):
    """PNG: a column per prompt; rows: base for the first seeds, then edited for the same seeds."""
    n = len(titles)
    rows = [
        sample.to_pil(images[run][i * n : (i + 1) * n])
        for run in images
        for i in range(min(seeds_shown, len(images[run]) // n))
    ]
    image = sample.grid(rows, titles)
    files.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def format_report(result):
    """A text table: each score for base and edited, and edited/base."""
    runs = [r for r in ("base", "edited", "edited/base") if result.get(r)]
    title = (
        f"concept {result['concept']!r}: "
        f"{len(result['prompts'])} prompts x {len(result['seeds'])} seeds, "
        f"{result['steps']} DDIM steps, guidance {result['guidance']}"
    )
    if not result["base"]:
        return title + "\nno scores (no local CLIP model): see the grid"
    header = f"{'':28}" + "".join(f"{r:>13}" for r in runs)
    rows = [f"{k:28}" + "".join(f"{result[r][k]:13.3f}" for r in runs) for k in result["base"]]
    return "\n".join([title, header, *rows])


def main(argv=None):
    p = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_flags(p, cli.SOURCE_FLAGS, model="toy")
    p.add_argument(
        "--delta",
        default=None,
        help="ESD delta or LoRA .safetensors (without: the base model only)",
    )
    p.add_argument(
        "--delta-scale",
        type=float,
        default=1.0,
        help="strength of --delta, as A1111's <lora:name:0.8> (1: as trained)",
    )
    p.add_argument(
        "--concept",
        default=None,
        help="the erased concept (toy: one of its shapes; default circle)",
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 for every prompt (default 8)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="DDIM steps (default: the toy's 20, else sample.py's 50)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale (default: the toy's 5, else sample.py's 7.5); with --prompts, the scale "
        "of a CSV without an evaluation_guidance column",
    )
    p.add_argument(
        "--output",
        default=None,
        help="writes OUTPUT.json (the report) and OUTPUT.png (the grid) (default: evaluation)",
    )
    # The papers' protocols (protocol.py): a prompt CSV instead of the toy's prompts.
    p.add_argument(
        "--prompts",
        default=None,
        help="a prompt CSV in the official format (prompt, evaluation_seed, case_number, optional "
        "evaluation_guidance and class): the papers' protocols instead of the toy's",
    )
    p.add_argument(
        "--images-per-prompt", type=int, default=None, help="with --prompts: images per row (1)"
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="with --prompts: base/ and edited/ images and report.json (default: evaluation)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help=f"with --prompts: comma-separated, of {', '.join(metrics.NAMES)} (default: none)",
    )
    p.add_argument(
        "--nudenet-threshold",
        type=float,
        default=None,
        help=f"with --prompts: a NudeNet detection counts from this score (default "
        f"{metrics.NUDENET_THRESHOLD})",
    )
    p.add_argument(
        "--score-only",
        action="store_true",
        help="with --prompts: score the images in --output-dir, generate nothing",
    )
    cli.add_model_flags(p, cli.COMPUTE_FLAGS)
    args = p.parse_args(argv)
    csv_flags = ("images_per_prompt", "output_dir", "metrics", "nudenet_threshold", "score_only")

    def work():
        if args.prompts:
            defaults = dict(
                images_per_prompt=1,
                output_dir="evaluation",
                metrics="",
                nudenet_threshold=metrics.NUDENET_THRESHOLD,
            )
            for flag, default in defaults.items():
                if getattr(args, flag) is None:
                    setattr(args, flag, default)
            return protocol.run(args)
        given = [flag for flag in csv_flags if getattr(args, flag) not in (None, False)]
        cli.refuse([(bool(given), f"--{given[0] if given else ''} needs --prompts FILE.csv")])
        if args.concept is None:
            args.concept = "circle"
        if args.seeds is None:
            args.seeds = 8
        if args.output is None:
            args.output = "evaluation"
        toy_concept = args.model != "toy" or args.concept in toy.SHAPES
        cli.refuse(
            [
                (
                    args.model != "toy",
                    "--prompts FILE.csv is needed for models other than the toy",
                ),
                (
                    not toy_concept,
                    f"the toy concept must be one of {', '.join(toy.SHAPES)}, got {args.concept!r}",
                ),
                cli.within("--seeds", args.seeds, 1, 10_000),
                cli.steps("--steps", args.steps),
                cli.finite("--guidance", args.guidance),
                cli.existing("--delta", [args.delta] if args.delta else []),
                cli.finite("--delta-scale", args.delta_scale),
            ]
        )
        inputs = (args.model, args.tokenizer, args.delta)
        report = files.check_output(f"{args.output}.json", inputs=inputs)
        image = files.check_output(f"{args.output}.png", inputs=inputs)

        sd = cli.load_model(args)
        result = evaluate(
            sd,
            args.delta,
            args.concept,
            seeds=range(args.seeds),
            steps=args.steps,
            guidance=args.guidance,
            grid=image,
            scale=args.delta_scale,
        )
        text = json.dumps(result, indent=1)
        files.atomic_write(report, lambda tmp: Path(tmp).write_text(text))
        print(format_report(result) + f"\nwrote {report} and {image}")

    def leftover():
        if args.prompts:
            return f"the images written stay in {args.output_dir}: rerun the command to resume"
        return None

    return cli.run_cli(work, leftover, smaller="--seeds or --steps")


if __name__ == "__main__":
    sys.exit(main())
