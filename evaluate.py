"""evaluate.py: how much of a concept an ESD delta erased, and what else it changed.

One protocol for the base model and the edited one (base + delta): the same prompts and seeds' noise, DDIM with
CFG. On the toy a CNN judges every image: the erased-concept rate for the concept alone ("circle", "a circle")
and in context ("a red circle", ...), as ESD (Gandikota et al. arXiv 2303.07345, sec. 4) contrasts ESD-x with
ESD-u, plus the other shapes' and colors' accuracy. Real models: the user's prompts, CLIP zero-shot scores (arXiv 2103.00020).

    python evaluate.py --model toy --delta esd-x-circle.safetensors --concept circle
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import delta
import files
import load_sd
import sample
import sampler
import toy

CLIP_MODEL = (
    "openai/clip-vit-large-patch14"  # zero-shot judge for real models, used only if cached locally
)


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
    """Shares of images (seed-major): concept shown alone / in context; other shapes right; colors right where asked."""
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


def clip_scores(images, labels, name=CLIP_MODEL):
    """Share of images whose best CLIP label is labels[0], and its mean probability; None without a local CLIP."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model, proc = (
            c.from_pretrained(name, local_files_only=True) for c in (CLIPModel, CLIPProcessor)
        )
    except (OSError, ValueError) as e:
        print(
            f"CLIP zero-shot scores skipped: no local CLIP model {name} ({str(e).splitlines()[0]})",
            file=sys.stderr,
        )
        return None
    inputs = proc(text=labels, images=sample.to_pil(images), return_tensors="pt", padding=True)
    probs = model(**inputs).logits_per_image.softmax(
        -1
    )  # no grad: evaluate() runs under torch.no_grad
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
):
    """{"base": scores, "edited": scores with delta `edit` (a file or {name: tensor}) applied, "edited/base"}: toy
    scores if `prompts` is None, else CLIP's for `prompts` over `labels` (labels[0]: the concept). grid: a PNG path."""
    is_toy, seeds = prompts is None, list(seeds)
    sampling = (
        dict(toy.SAMPLING)
        if is_toy
        else dict(
            steps=sample.DDIM_STEPS,
            guidance=sample.GUIDANCE,
            height=sd.image_size,
            width=sd.image_size,
        )
    )
    sampling.update(
        {k: v for k, v in dict(steps=steps, guidance=guidance).items() if v is not None}
    )
    entries = toy_prompts(concept) if is_toy else [(p, "prompt", None, None) for p in prompts]
    result = {
        "concept": concept,
        "prompts": [e[0] for e in entries],
        "seeds": seeds,
        "steps": sampling["steps"],
        "guidance": sampling["guidance"],
    }
    images = {}
    for run in ("base", "edited") if edit is not None else ("base",):
        with delta.applied(
            sd.unet, *[edit] if run == "edited" else []
        ):  # the base weights back afterwards
            images[run] = sampler.generate(
                sd, result["prompts"], seeds, **sampling
            )  # a seed per batch
        result[run] = (
            toy_scores(*toy.classify(images[run], classifier), entries, concept)
            if is_toy
            else clip_scores(images[run], labels or [concept, "a photo"])
        )
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
    lines = [
        f"concept {result['concept']!r}: {len(result['prompts'])} prompts x {len(result['seeds'])} seeds, "
        f"{result['steps']} DDIM steps, guidance {result['guidance']}",
        f"{'':28}" + "".join(f"{r:>13}" for r in runs),
    ]
    if not result["base"]:
        return lines[0] + "\nno scores (no local CLIP model): see the grid"
    return "\n".join(
        lines + [f"{k:28}" + "".join(f"{result[r][k]:13.3f}" for r in runs) for k in result["base"]]
    )


def main(argv=None):
    p = files.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="toy", help="'toy', a single file, a diffusers folder or a hub id"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or hub id (single-file models)"
    )
    p.add_argument("--revision", default=None, help="hub models: branch, tag or commit")
    p.add_argument(
        "--variant", default=None, help="diffusers folders and hub models: weight files *.VARIANT.*"
    )
    p.add_argument(
        "--prediction-type", default=None, choices=load_sd.PREDICTIONS, help=load_sd.PREDICTION_HELP
    )
    p.add_argument(
        "--delta", default=None, help="ESD delta .safetensors (without: the base model only)"
    )
    p.add_argument(
        "--concept", default="circle", help="the erased concept (toy: one of its shapes)"
    )
    p.add_argument(
        "--prompts", nargs="+", default=None, help="real models: the prompts to generate"
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=["a photo"],
        help="real models: CLIP labels besides the concept",
    )
    p.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 for every prompt")
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
        help="CFG scale (default: the toy's 5, else sample.py's 7.5)",
    )
    p.add_argument(
        "--output",
        default="evaluation",
        help="writes OUTPUT.json (the report) and OUTPUT.png (the grid)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    def work():
        files.refuse(
            [
                (
                    args.model != "toy" and not args.prompts,
                    "--prompts is needed for models other than the toy",
                ),
                (
                    args.model == "toy" and args.concept not in toy.SHAPES,
                    f"the toy concept must be one of {', '.join(toy.SHAPES)}, got {args.concept!r}",
                ),
                (not 1 <= args.seeds <= 10_000, "--seeds must be in 1..10000"),
                (
                    args.steps is not None and not 1 <= args.steps < 1000,
                    "--steps must be in 1..999",
                ),
                (
                    args.guidance is not None and not abs(args.guidance) < float("inf"),
                    "--guidance must be a finite number",
                ),
                (
                    args.delta is not None and not os.path.isfile(args.delta),
                    f"no such --delta file: {args.delta}",
                ),
            ]
        )
        inputs = (args.model, args.tokenizer, args.delta)
        report, image = (
            files.check_output(f"{args.output}.{ext}", inputs=inputs) for ext in ("json", "png")
        )
        sd = load_sd.load(
            args.model,
            tokenizer=args.tokenizer,
            device=args.device,
            revision=args.revision,
            variant=args.variant,
            prediction_type=args.prediction_type,
        )
        result = evaluate(
            sd,
            args.delta,
            args.concept,
            prompts=args.prompts,
            seeds=range(args.seeds),
            steps=args.steps,
            guidance=args.guidance,
            labels=[args.concept, *args.labels],
            grid=image,
        )
        files.atomic_write(report, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        print(format_report(result) + f"\nwrote {report} and {image}")

    return files.run_cli(work, smaller="--seeds or --steps")


if __name__ == "__main__":
    sys.exit(main())
