"""sample.py: text -> PNG with our Stable Diffusion (DDIM sampling, classifier-free guidance).

    python sample.py --model CompVis/stable-diffusion-v1-4 --prompt "a photo of a car"
    python sample.py --model sd-v1-4.safetensors --prompt "a car" --num-images 4 --seed 1
    python sample.py --model toy --prompt "a red circle" --prompt "a circle" --delta esd.safetensors --compare

Image i of --num-images has seed --seed + i: the image diffusers' StableDiffusionPipeline (DDIM) draws for it.
"""
import argparse
import json
import math
import os
import sys

import torch
from PIL import Image, ImageDraw, PngImagePlugin

import delta
import files
import load_sd
import sampler

DDIM_STEPS, GUIDANCE = 50, 7.5  # SD's usual sampling, diffusers' pipeline defaults
MIN_CELL = 96  # grid cells are at least this many pixels wide: small images are enlarged


def to_pil(images):
    """Images [N, 3, H, W] in [-1, 1] -> 8-bit PIL images, clamped and rounded as diffusers' numpy_to_pil."""
    arrays = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)
    return [Image.fromarray(a.numpy()) for a in arrays]


def grid(rows, titles=()):
    """One image of equally sized PIL images, rows[i][j] at row i, column j, each enlarged by a whole factor
    (nearest neighbour) to at least MIN_CELL pixels; `titles` above the columns."""
    w, h = rows[0][0].size
    k = math.ceil(MIN_CELL / w)
    top = 16 if titles else 0
    canvas = Image.new("RGB", (k * w * len(rows[0]), top + k * h * len(rows)), "white")
    for j, title in enumerate(titles):
        ImageDraw.Draw(canvas).text((j * k * w + 2, 2), title[:k * w // 6], fill="black")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image.resize((k * w, k * h), Image.NEAREST), (j * k * w, top + i * k * h))
    return canvas


def infotext(p):
    """A1111's `parameters` text: the prompt, its negative prompt, then one line of "Key: value" settings."""
    negative = [f"Negative prompt: {p['negative_prompt']}"] if p["negative_prompt"] else []
    model = os.path.basename(p["model"].rstrip("/")).removesuffix(".safetensors").removesuffix(".ckpt")
    settings = (f"Steps: {p['steps']}, Sampler: DDIM, CFG scale: {p['guidance']}, Seed: {p['seed']}, "
                f"Size: {p['width']}x{p['height']}, Model: {model}")
    return "\n".join([p["prompt"], *negative, settings])


def save_png(image, path, parameters):
    """A PNG, atomically: A1111's text under `parameters` (A1111, ComfyUI, civitai read it), all as JSON under `esd`."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(parameters))
    info.add_text("esd", json.dumps(parameters))
    files.atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate images with Stable Diffusion (DDIM + CFG).")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="single file, diffusers folder, hub id, or 'toy'")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (single-file models)")
    p.add_argument("--revision", default=None, help="hub models: branch, tag or commit")
    p.add_argument("--variant", default=None, help="diffusers folders and hub models: weight files *.VARIANT.*, e.g. fp16")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--negative-prompt", default="", help="prompt for the unconditional branch of CFG")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i has seed + i")
    p.add_argument("--steps", type=int, default=DDIM_STEPS, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's size, e.g. 512; the toy's 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's size, e.g. 512; the toy's 32)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt, seeds --seed, --seed + 1, ...")
    p.add_argument("--output", default="sample.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=load_sd.DTYPES)
    p.add_argument("--delta", action="append", default=[], help="ESD delta file to apply (repeatable)")
    p.add_argument("--compare", action="store_true", help="one grid: the original's images (top row) above the edited")
    return p.parse_args(argv)


def check_args(args, scale_factor=1):
    """Raise LoadError (-> one line, exit 2) for values no run could succeed with."""
    if args.steps < 1 or args.num_images < 1:
        raise files.LoadError("--steps and --num-images must be at least 1")
    if args.compare and not args.delta:
        raise files.LoadError("--compare needs at least one --delta to compare against")
    if any(s is not None and (s <= 0 or s % scale_factor) for s in (args.height, args.width)):
        raise files.LoadError(f"--height and --width must be positive multiples of {scale_factor}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise files.LoadError(f"output folder does not exist: {os.path.dirname(args.output)}")


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        sd = load_sd.load(args.model, tokenizer=args.tokenizer, device=args.device, dtype=load_sd.DTYPES[args.dtype],
                          revision=args.revision, variant=args.variant)
        check_args(args, sd.vae.scale_factor)
        args.height, args.width = args.height or sd.image_size, args.width or sd.image_size
        seeds = list(range(args.seed, args.seed + args.num_images))
        settings = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                        height=args.height, width=args.width, progress=True)
        with delta.applied(sd.unet, *args.delta):
            images = to_pil(sampler.generate(sd, args.prompt, seeds, **settings))
        parameters = [dict(vars(args), prompts=args.prompt, prompt=prompt, seed=seed)
                      for seed in seeds for prompt in args.prompt]  # generate's order: seed-major
        if args.compare:  # top row: the same prompts and noise through the original weights; the first's settings
            images = [grid([to_pil(sampler.generate(sd, args.prompt, seeds, **settings)), images])]
        stem, ext = os.path.splitext(args.output)  # out.png for one image; out-0.png, out-1.png, ... for several
        paths = [args.output] if len(images) == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(len(images))]
        for image, path, image_parameters in zip(images, paths, parameters):
            save_png(image, path, image_parameters)
            print(f"wrote {path}")
    except files.LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
