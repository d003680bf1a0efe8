"""sample.py: text -> PNG with our Stable Diffusion (DDIM sampling, classifier-free guidance).

    python sample.py --model sd-v1-4.safetensors --prompt "a photo of a car" --num-images 4 --seed 1
    python sample.py --model toy --prompt "a red circle" --prompt "a circle" \
        --delta esd.safetensors --compare

Image i of --num-images has seed --seed + i: the image diffusers' StableDiffusionPipeline (DDIM)
draws for it.
"""

import json
import math
import os
import sys

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import cli
import delta
import files
import sampler

# SD's usual sampling: diffusers' pipeline defaults.
DDIM_STEPS = 50
GUIDANCE = 7.5
# Grid cells are at least 96 px wide (small images enlarged); a grid holds 64 images at most.
MIN_CELL = 96
MAX_GRID = 64


def to_pil(images):
    """Images [N, 3, H, W] in [-1, 1] -> 8-bit PIL images, clamped and rounded as diffusers'
    numpy_to_pil."""
    pixels = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu() * 255
    arrays = pixels.round().to(torch.uint8)  # [N, H, W, 3]
    return [Image.fromarray(a.numpy()) for a in arrays]


def grid(rows, titles=(), cell=MIN_CELL):
    """One image of equally sized PIL images, rows[i][j] at row i, column j, each enlarged by a
    whole factor (nearest neighbour) to at least `cell` pixels wide; `titles` above the columns."""
    w, h = rows[0][0].size
    k = math.ceil(cell / w)
    top = 16 if titles else 0
    canvas = Image.new("RGB", (k * w * len(rows[0]), top + k * h * len(rows)), "white")
    for j, title in enumerate(titles):
        ImageDraw.Draw(canvas).text((j * k * w + 2, 2), title[: k * w // 6], fill="black")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image.resize((k * w, k * h), Image.NEAREST), (j * k * w, top + i * k * h))
    return canvas


def infotext(p):
    """A1111's `parameters` text: the prompt, its negative prompt, then one line of "Key: value"
    settings."""
    negative = [f"Negative prompt: {p['negative_prompt']}"] if p["negative_prompt"] else []
    name = os.path.basename(p["model"].rstrip("/"))
    model = name.removesuffix(".safetensors").removesuffix(".ckpt")
    settings = (
        f"Steps: {p['steps']}, Sampler: DDIM, CFG scale: {p['guidance']}, Seed: {p['seed']}, "
        f"Size: {p['width']}x{p['height']}, Model: {model}"
    )
    return "\n".join([p["prompt"], *negative, settings])


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Generate images with Stable Diffusion (DDIM + CFG).")
    cli.add_model_flags(p, cli.SOURCE_FLAGS, model="CompVis/stable-diffusion-v1-4")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument(
        "--negative-prompt", default="", help="prompt for the unconditional branch of CFG"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image i has seed + i"
    )
    p.add_argument("--steps", type=int, default=DDIM_STEPS, help="DDIM steps")
    p.add_argument(
        "--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale"
    )
    p.add_argument(
        "--height", type=int, default=None, help="pixels (default: the model's size; the toy's 32)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="pixels (default: the model's size; the toy's 32)"
    )
    p.add_argument(
        "--num-images", type=int, default=1, help="images per prompt, seeds --seed, --seed + 1, ..."
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="images generated at once (then written)"
    )
    p.add_argument("--output", default="sample.png")
    cli.add_model_flags(p, cli.COMPUTE_FLAGS)
    p.add_argument(
        "--delta",
        action="append",
        default=[],
        help="ESD delta or LoRA file to apply (repeatable)",
    )
    p.add_argument(
        "--delta-scale",
        type=float,
        default=1.0,
        help="strength of each --delta, as A1111's <lora:name:0.8> (1: as trained)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="one grid: the original's images (top row) above the edited",
    )
    return p.parse_args(argv)


def check_args(args):
    """The output paths, after refusing (LoadError: one line, exit 2) any value or path no run
    could succeed with."""
    images = len(args.prompt) * args.num_images
    cli.refuse(
        [
            cli.steps("--steps", args.steps),
            cli.finite("--guidance", args.guidance),
            cli.seed("--seed", args.seed, images=args.num_images),
            (
                min(args.num_images, args.batch_size) < 1,
                "--num-images and --batch-size must be at least 1",
            ),
            # None: the model's size.
            cli.side("--height", args.height),
            cli.side("--width", args.width),
            (
                args.compare and not args.delta,
                "--compare needs at least one --delta to compare against",
            ),
            (
                args.compare and images > MAX_GRID,
                f"--compare draws one grid of at most {MAX_GRID} images",
            ),
            cli.existing("--delta", args.delta),
            cli.finite("--delta-scale", args.delta_scale),
        ]
    )

    # out.png for one image; out-0.png, out-1.png, ... for several.
    stem, ext = os.path.splitext(args.output)
    if images == 1 or args.compare:
        paths = [args.output]
    else:
        paths = [f"{stem}-{i}{ext or '.png'}" for i in range(images)]
    inputs = (args.model, args.tokenizer, *args.delta)
    return [files.check_output(path, inputs=inputs) for path in paths]


def main(argv=None):
    args = parse_args(argv)

    def work():
        paths = check_args(args)
        sd = cli.load_model(args)
        args.height = args.height or sd.image_size
        args.width = args.width or sd.image_size
        settings = dict(
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            height=args.height,
            width=args.width,
            batch_size=args.batch_size,
        )
        seeds = list(range(args.seed, args.seed + args.num_images))

        # What each image is written with, in generate's order: seed-major.
        parameters = [
            dict(vars(args), prompts=args.prompt, prompt=prompt, seed=seed)
            for seed in seeds
            for prompt in args.prompt
        ]
        outputs = zip(paths, parameters)

        def write(images):
            """Each image to its own path, with its own prompt and seed, as it comes."""
            for image, (path, image_parameters) in zip(images, outputs):
                texts = {
                    "parameters": infotext(image_parameters),
                    "esd": json.dumps(image_parameters),
                }
                files.save_png(image, path, texts)
                tqdm.write(f"wrote {path}")

        # Batches of seeds, each with every prompt (--compare: one batch, one grid).
        per_batch = max(1, args.batch_size // len(args.prompt))
        if args.compare:
            batches = [seeds]
        else:
            batches = [seeds[i : i + per_batch] for i in range(0, len(seeds), per_batch)]

        # Without --delta: the model as it is.
        with delta.applied(sd.unet, *args.delta, scale=args.delta_scale):
            for batch in tqdm(batches, desc="batches", disable=len(batches) == 1):
                images = to_pil(sampler.generate(sd, args.prompt, batch, **settings))
                if not args.compare:
                    write(images)

        # One grid: the same prompts and noise through the original weights, above the edited.
        if args.compare:
            original = to_pil(sampler.generate(sd, args.prompt, seeds, **settings))
            write([grid([original, images])])

    return cli.run_cli(work, smaller="--height and --width, or --batch-size")


if __name__ == "__main__":
    sys.exit(main())
