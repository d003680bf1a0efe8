"""sample.py: text -> PNG with our Stable Diffusion (DDIM sampling, classifier-free guidance).

    python sample.py --model CompVis/stable-diffusion-v1-4 --prompt "a photo of a car"
    python sample.py --model sd-v1-4.safetensors --prompt "a car" --num-images 4 --seed 1
    python sample.py --model toy --prompt "a red circle" --prompt "a circle" --delta esd.safetensors --compare

Same model, prompt, seed, steps and guidance give the same image as diffusers'
StableDiffusionPipeline with DDIMScheduler: the initial noise is drawn exactly as DESIGN.md says.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

import load_sd
import sampler

SD_SIZE, TOY_SIZE = 512, 32  # default image sides: SD v1's training resolution; the toy model's (toy.py)


def initial_noise(n, latent_shape, seed):
    """The seed's noise [n, 4, h, w], drawn on the CPU (as a diffusers pipeline given
    torch.Generator("cpu").manual_seed(seed) draws it) so every device sees the same numbers."""
    return torch.randn((n, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed))


@torch.no_grad()
def generate(sd, prompts, *, negative_prompt="", seed=0, steps=50, guidance=7.5, height=512, width=512,
             progress=False):
    """Images [N, 3, H, W] in [-1, 1], one per prompt, all from one seeded noise batch."""
    param = next(sd.unet.parameters())
    x_T = initial_noise(len(prompts), sd.latent_shape(height, width), seed).to(param.device, param.dtype)
    cond = sd.encode_prompts(prompts)
    uncond = sd.encode_prompts([negative_prompt] * len(prompts))
    latents = sampler.sample(sd.unet, x_T, cond, uncond, steps=steps, guidance=guidance,
                             prediction=sd.prediction_type, progress=progress)
    return sd.decode_latents(latents)


def to_pil(images):
    """[-1, 1] images -> 8-bit PIL images, rounded as diffusers' numpy_to_pil rounds."""
    arrays = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]


def save_png(image, path, parameters):
    """Write a PNG atomically, with the generation parameters as JSON in its text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    load_sd.atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def grid(rows):
    """One image of equally sized PIL images, rows[i][j] at row i, column j."""
    w, h = rows[0][0].size
    canvas = Image.new("RGB", (w * len(rows[0]), h * len(rows)))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image, (j * w, i * h))
    return canvas


def apply_deltas(unet, paths):
    """Apply ESD delta files in order; the original values of every tensor they touch."""
    originals, params = {}, dict(unet.named_parameters())
    for path in paths:
        delta, _ = load_sd.load_delta(path)
        originals.update({k: params[k].detach().clone() for k in delta if k in params and k not in originals})
        try:
            load_sd.apply_delta(unet, delta)
        except load_sd.LoadError as e:
            raise load_sd.LoadError(f"cannot apply delta {path}: {e}") from None
    return originals


def output_paths(output, n):
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    stem, ext = os.path.splitext(output)
    return [output] if n == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate images with Stable Diffusion (DDIM + CFG).")
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                   help="single file (.safetensors/.ckpt), diffusers folder, hub repo id, or 'toy'")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (single-file models)")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--negative-prompt", default="", help="prompt for the unconditional branch of CFG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None, help="pixels (default: 512; the toy model's 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: 512; the toy model's 32)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--output", default="sample.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=load_sd.DTYPES)
    p.add_argument("--delta", action="append", default=[], help="ESD delta file to apply (repeatable)")
    p.add_argument("--compare", action="store_true",
                   help="write one grid: original model's images (top row) above the edited model's (bottom)")
    args = p.parse_args(argv)
    size = TOY_SIZE if args.model == "toy" else SD_SIZE
    args.height, args.width = args.height or size, args.width or size
    return args


def check_args(args, scale_factor):
    """Raise LoadError (-> one line, exit 2) for values no run could succeed with."""
    if args.steps < 1 or args.num_images < 1:
        raise load_sd.LoadError("--steps and --num-images must be at least 1")
    if args.compare and not args.delta:
        raise load_sd.LoadError("--compare needs at least one --delta to compare against")
    if args.height % scale_factor or args.width % scale_factor or min(args.height, args.width) <= 0:
        raise load_sd.LoadError(f"--height and --width must be positive multiples of {scale_factor}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise load_sd.LoadError(f"output folder does not exist: {os.path.dirname(args.output)}")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise load_sd.LoadError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
        sd = load_sd.load(args.model, tokenizer=args.tokenizer, device=args.device, dtype=load_sd.DTYPES[args.dtype])
        check_args(args, sd.vae.scale_factor)
        originals = apply_deltas(sd.unet, args.delta)
        prompts = [prompt for prompt in args.prompt for _ in range(args.num_images)]
        settings = dict(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                        guidance=args.guidance, height=args.height, width=args.width, progress=True)
        images = to_pil(generate(sd, prompts, **settings))
        params = {k: v for k, v in vars(args).items() if k not in ("output", "device")}
        if args.compare:  # the same prompts and noise through the original weights: the top row
            load_sd.apply_delta(sd.unet, originals)
            save_png(grid([to_pil(generate(sd, prompts, **settings)), images]), args.output, params)
            tqdm.write(f"wrote {args.output} (top: original, bottom: with {', '.join(args.delta)})")
            return 0
        for i, (image, path) in enumerate(zip(images, output_paths(args.output, len(images)))):
            save_png(image, path, dict(params, index=i))
            tqdm.write(f"wrote {path}")
    except load_sd.LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
