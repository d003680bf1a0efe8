"""unet.UNet against diffusers' UNet2DConditionModel with the same weights: forward (no grad, as in
sampling) and forward+backward (as in ESD training) time, medians of interleaved repeats, and peak
memory; prints ours/diffusers ratios (target <= 1.0). Layouts: SD v1, and SDXL (no attention at the first
level, transformer depth 2 and 10, the added embedding of pooled text and size numbers). On the CPU both
run at reduced widths and small latents, and SD v1 also at full size; full-size SDXL (fp32 weights and
gradients alone are 20 GiB) runs only with --device cuda.

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
from diffusers import UNet2DConditionModel  # the oracle: benchmarks and tests only
from diffusers.utils import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import configs  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402

CONTEXT_LEN = 77  # CLIP text tokens
TIMESTEP = 981  # first of SD's 50 DDIM steps
# SD v1's UNet (runwayml/stable-diffusion-v1-5 unet/config.json); cases are (config, batch, latent side).
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
SIZE_NUMBERS = 6  # SDXL's added numbers: original (h, w), crop (top, left), target (h, w), after the pooled text
CASES = {
    "SD v1 layout, widths / 5, 32x32 latents, batch 2": (
        dict(SD1, block_out_channels=[64, 128, 256, 256]),
        2,
        32,
    ),
    "SD v1 full size, 8x8 latents, batch 1": (SD1, 1, 8),
    "SDXL layout, widths / 5 (64-dim heads: 1, 2, 4), depths 2 and 10, text width 2048, 32x32 latents, batch 2": (
        dict(SDXL, block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4]),
        2,
        32,
    ),
}
GPU_CASES = {
    "SDXL full size, 128x128 latents (1024 px), batch 2": (SDXL, 2, 128)
}  # with --device cuda


def build(config, device, dtype, names=("ours", "diffusers")):
    """{name: (module, f(x, t, context) -> eps)}; with both, ours shares diffusers' weight tensors."""
    built = {}
    if "diffusers" in names:
        ref = UNet2DConditionModel(**config).to(device, dtype)
        built["diffusers"] = (
            ref,
            lambda x, t, c, *added: (
                ref(x, t, encoder_hidden_states=c, added_cond_kwargs=diffusers_added(*added)).sample
            ),
        )
    if "ours" in names:
        ours = UNet(configs.config_from_json(UNetConfig, config)).to(device, dtype)
        if "diffusers" in names:
            ours.load_state_dict(
                ref.state_dict(), strict=True, assign=True
            )  # same tensors, no copy
        built["ours"] = ours, ours
    return built


def diffusers_added(added=None):
    """Our `added` [B, pooled + 6] in diffusers' spelling: added_cond_kwargs text_embeds and time_ids."""
    return (
        None
        if added is None
        else {"text_embeds": added[:, :-SIZE_NUMBERS], "time_ids": added[:, -SIZE_NUMBERS:]}
    )


def inputs(config, batch, side, device, dtype):
    """The UNet's arguments: x, t, context, and for SDXL `added` (random pooled text, the image's size numbers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g)
    context = torch.randn(batch, CONTEXT_LEN, config["cross_attention_dim"], generator=g)
    args = (
        x.to(device, dtype),
        torch.full((batch,), TIMESTEP, device=device),
        context.to(device, dtype),
    )
    if not config.get("addition_embed_type"):
        return args
    pooled = (
        config["projection_class_embeddings_input_dim"]
        - SIZE_NUMBERS * config["addition_time_embed_dim"]
    )
    pixels = side * 8  # the VAE's 8x: uncropped, original = target size
    numbers = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=torch.float32).expand(
        batch, -1
    )
    return *args, torch.cat([torch.randn(batch, pooled, generator=g), numbers], dim=-1).to(
        device, dtype
    )


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
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        run(model, args, train, device)
    with (
        tempfile.TemporaryDirectory() as folder
    ):  # the trace lists each allocation (+) and free (-)
        prof.export_chrome_trace(path := os.path.join(folder, "trace.json"))
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
    logging.set_verbosity_error()  # diffusers' warning on casting with .to(dtype)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, 1 thread, process time"
    print(
        f"torch {torch.__version__}, {where}, {args.dtype}, median of {args.repeats} interleaved repeats"
    )
    for case, (config, batch, side) in (
        CASES | (GPU_CASES if args.device == "cuda" else {})
    ).items():
        models, x = (
            build(config, args.device, dtype),
            inputs(config, batch, side, args.device, dtype),
        )
        times = {(name, train): [] for name in models for train in (False, True)}
        for r in range(args.repeats + 1):  # repeat 0 is a warm-up
            order = list(models) if r % 2 else list(models)[::-1]
            for train in (False, True):
                for name in order:
                    seconds = run(models[name], x, train, args.device)
                    times[name, train] += [seconds] if r else []
        mem = {
            (name, train): peak_bytes(models[name], x, train, args.device) for name, train in times
        }
        del models, x
        print(f"\n{case}")
        for train, label in ((False, "forward"), (True, "forward+backward")):
            ours, ref = (statistics.median(times[name, train]) for name in ("ours", "diffusers"))
            mem_ours, mem_ref = mem["ours", train], mem["diffusers", train]
            print(
                f"  {label:16s} time ours {ours * 1e3:8.1f} ms  diffusers {ref * 1e3:8.1f} ms  ratio "
                f"{ours / ref:.3f} | peak memory ours {mem_ours / 2**20:7.1f} MiB  diffusers "
                f"{mem_ref / 2**20:7.1f} MiB  ratio {mem_ours / mem_ref:.3f}"
            )


if __name__ == "__main__":
    main()
