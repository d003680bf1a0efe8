"""unet.UNet against diffusers' UNet2DConditionModel with the same weights: forward (no grad, as
in sampling) and forward+backward (as in ESD training) time, medians of interleaved repeats, and
peak memory; prints ours/diffusers ratios (target <= 1.0). Layouts: SD v1, and SDXL (no attention
at the first level, transformer depth 2 and 10, the added embedding of pooled text and size
numbers). On the CPU both run at reduced widths and small latents, and SD v1 also at full size;
full-size SDXL (fp32 weights and gradients alone are 20 GiB) runs only with --device cuda.

Time: on the CPU, process CPU time with one thread (robust to other jobs sharing the machine);
on a GPU, wall time between synchronizes. Peak memory: tensor bytes allocated during one call above
what was live before it, from torch.cuda.max_memory_allocated on a GPU and from the profiler's log
of every allocation and free on the CPU (tracemalloc cannot see tensor storage, which torch
allocates outside Python's allocator).

    python bench/bench_unet.py [--device cuda] [--dtype bfloat16] [--repeats 3]
"""

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

# diffusers: the oracle, in benchmarks and tests only
from diffusers import UNet2DConditionModel
from diffusers.utils import logging

# the repository root, for the product's modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configs  # noqa: E402
from unet import SIZE_NUMBERS, UNet, UNetConfig  # noqa: E402

# CLIP text tokens
CONTEXT_LEN = 77
# The first of SD's 50 DDIM steps
TIMESTEP = 981
# SD v1's UNet (runwayml/stable-diffusion-v1-5 unet/config.json)
SD1 = dict(
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
)
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL = dict(
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
    up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    layers_per_block=2,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD1_SMALL = dict(SD1, block_out_channels=[64, 128, 256, 256])
SDXL_SMALL = dict(SDXL, block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4])
# name -> (config, batch, latent side)
CASES = {
    "SD v1 layout, widths / 5, 32x32 latents, batch 2": (SD1_SMALL, 2, 32),
    "SD v1 full size, 8x8 latents, batch 1": (SD1, 1, 8),
    "SDXL layout, widths / 5 (64-dim heads: 1, 2, 4), depths 2 and 10, text width 2048, "
    "32x32 latents, batch 2": (SDXL_SMALL, 2, 32),
}
# with --device cuda
GPU_CASES = {"SDXL full size, 128x128 latents (1024 px), batch 2": (SDXL, 2, 128)}


def build(config, device, dtype, names=("ours", "diffusers")):
    """{name: (module, f(x, t, context) -> eps)}; with both, ours shares diffusers' weight
    tensors."""
    built = {}
    if "diffusers" in names:
        ref = UNet2DConditionModel(**config).to(device, dtype)

        def diffusers_eps(x, t, c, *added):
            return ref(
                x, t, encoder_hidden_states=c, added_cond_kwargs=diffusers_added(*added)
            ).sample

        built["diffusers"] = (ref, diffusers_eps)
    if "ours" in names:
        ours = UNet(configs.config_from_json(UNetConfig, config)).to(device, dtype)
        if "diffusers" in names:
            # the same tensors, no copy
            ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
        built["ours"] = (ours, ours)
    return built


def diffusers_added(added=None):
    """Our `added` [B, pooled + 6] in diffusers' spelling: added_cond_kwargs text_embeds and
    time_ids."""
    if added is None:
        return None
    return {"text_embeds": added[:, :-SIZE_NUMBERS], "time_ids": added[:, -SIZE_NUMBERS:]}


def inputs(config, batch, side, device, dtype):
    """The UNet's arguments: x, t, context, and for SDXL `added` (random pooled text, the image's
    size numbers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, CONTEXT_LEN, config["cross_attention_dim"], generator=g)
    t = torch.full((batch,), TIMESTEP, device=device)
    args = (x.to(device, dtype), t, context.to(device, dtype))
    if not config.get("addition_embed_type"):
        return args

    # SDXL: pooled text, then the size numbers (the VAE's 8x: uncropped, original = target size)
    n_pooled = (
        config["projection_class_embeddings_input_dim"]
        - SIZE_NUMBERS * config["addition_time_embed_dim"]
    )
    pixels = side * 8
    numbers = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=torch.float32)
    pooled = torch.randn(batch, n_pooled, generator=g)
    added = torch.cat([pooled, numbers.expand(batch, -1)], dim=-1)
    return *args, added.to(device, dtype)


def run(model, args, train, device):
    """One forward (no grad) or forward+backward; returns its seconds."""
    module, f = model
    cuda = device == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    if train:
        f(*args).float().square().mean().backward()
    else:
        with torch.no_grad():
            f(*args)
    if cuda:
        torch.cuda.synchronize()
    seconds = clock() - start
    module.zero_grad(set_to_none=True)
    return seconds


def peak_bytes(model, args, train, device):
    """Peak tensor memory of one call, above what was allocated before it."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(model, args, train, device)
        return torch.cuda.max_memory_allocated() - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        run(model, args, train, device)

    # the trace lists each allocation (+) and free (-)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    return max(itertools.accumulate((e["args"]["Bytes"] for e in events), initial=0))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    # diffusers' warning on casting with .to(dtype)
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, 1 thread, process time"
    repeats = f"median of {args.repeats} interleaved repeats"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, {repeats}")

    cases = CASES | (GPU_CASES if args.device == "cuda" else {})
    for case, (config, batch, side) in cases.items():
        models = build(config, args.device, dtype)
        x = inputs(config, batch, side, args.device, dtype)

        # Time: repeat 0 is a warm-up; the two models take turns going first
        times = {(name, train): [] for name in models for train in (False, True)}
        for r in range(args.repeats + 1):
            order = list(models) if r % 2 else list(models)[::-1]
            for train in (False, True):
                for name in order:
                    seconds = run(models[name], x, train, args.device)
                    if r:
                        times[name, train].append(seconds)

        # Peak memory of one call each
        mem = {}
        for name, train in times:
            mem[name, train] = peak_bytes(models[name], x, train, args.device)
        del models, x

        print(f"\n{case}")
        for train, label in ((False, "forward"), (True, "forward+backward")):
            ours = statistics.median(times["ours", train])
            ref = statistics.median(times["diffusers", train])
            mem_ours = mem["ours", train]
            mem_ref = mem["diffusers", train]
            print(
                f"  {label:16s} time ours {ours * 1e3:8.1f} ms  diffusers {ref * 1e3:8.1f} ms  "
                f"ratio {ours / ref:.3f} | peak memory ours {mem_ours / 2**20:7.1f} MiB  "
                f"diffusers {mem_ref / 2**20:7.1f} MiB  ratio {mem_ours / mem_ref:.3f}"
            )


if __name__ == "__main__":
    main()
