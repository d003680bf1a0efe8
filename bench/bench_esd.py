"""ESD training cost: esd.ESD (one UNet + kept originals of the trained tensors, frozen predictions
by functional_call) against the straightforward two-copies implementation both official scripts
use (a diffusers UNet being trained and a deepcopy of it as the frozen model), same algorithm,
same weights, same seeds and t_enc sequence, x_t sampled every iteration (the paper). Also ours
with train.py's default x_t, an on-policy trajectory pool (esd.TrajectoryPool: N trajectories
from the model being trained, rebuilt every R iterations; --iters defaults to R, so the rebuild is
in the average): seconds per iteration are then seconds to the same number of x_t samples. And
ours as LoRA (train.py --lora R: a rank-R update of the method's modules, the frozen model the
same UNet with the update off, no originals kept). Prints seconds per iteration, memory and ratios
to the two-copies run, memory against two UNets' weights alone, and the size of each run's file
(the delta, or the LoRA file) against the full method's delta.

Time: on a GPU wall-clock seconds; on the CPU process CPU seconds with one thread, which a machine
shared with other jobs inflates far less than wall-clock time.
Memory: bytes of the tensors each run holds (UNet parameters, frozen copy or kept originals, grads,
Adam state, the pool's trajectories); on a GPU also torch.cuda.max_memory_allocated (activations
included).

    python bench/bench_esd.py [--device cuda] [--dtype bfloat16] [--iters R] [--pool N]
                              [--refresh R] [--latent 16] [--full] [--lora 4 16]
                              [--variants two-copies ours pool lora]
"""

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

# the repository root, for the product's modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# diffusers: a test/benchmark-only oracle
from diffusers import UNet2DConditionModel  # noqa: E402

import configs  # noqa: E402
import esd  # noqa: E402
import load_sd  # noqa: E402
import sampler  # noqa: E402
import train  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402

# CLIP text tokens
CONTEXT_LEN = 77
# SD v1 layout (runwayml/stable-diffusion-v1-5 unet/config.json) with every width / 5, the text
# width (768) included, so each filter keeps about SD v1's share of the parameters (ESD-x ~5%).
CONFIG = dict(
    block_out_channels=[64, 128, 256, 256],
    cross_attention_dim=160,
    attention_head_dim=8,
    layers_per_block=2,
)
# SD v1 itself (--full)
FULL = dict(CONFIG, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768)
# its trajectory_pool and pool_refresh: train.py's default x_t
DEFAULT = train.TrainConfig()
# --variants: the runs, by name
VARIANTS = {
    "two-copies": "two copies (diffusers)",
    "ours": "ours",
    "pool": "ours, pool",
    "lora": "ours, LoRA",
}


class TwoCopies:
    """The straightforward ESD: train a diffusers UNet, frozen predictions from a deepcopy of it."""

    def __init__(self, unet, method, steps, dtype):
        self.unet = unet.eval().requires_grad_(False)
        self.frozen = copy.deepcopy(unet)
        self.params = {n: p for n, p in unet.named_parameters() if esd.FILTERS[method](n)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.steps = steps
        self.timesteps = sampler.ddim_timesteps(steps)
        self.device = next(unet.parameters()).device.type
        self.dtype = dtype

    def autocast(self):
        return torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def eps(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def sample(self, x_T, cond, uncond, until, xt_from="trained"):
        """x_t from the model being trained, as train-esd.py (esd.ESD.sample's arguments)."""
        assert xt_from == "trained"
        with torch.no_grad(), self.autocast():
            return sampler.sample(
                self.eps,
                x_T,
                cond,
                uncond,
                steps=self.steps,
                guidance=esd.GUIDANCE,
                until=until,
            )

    def loss(self, x_t, t_enc, cond, uncond):
        t = int(self.timesteps[t_enc])
        # two calls, as both official scripts
        with torch.no_grad(), self.autocast():
            e_0 = self.frozen(x_t, t, encoder_hidden_states=uncond).sample.float()
            e_c = self.frozen(x_t, t, encoder_hidden_states=cond).sample.float()
        with self.autocast():
            e_n = self.unet(x_t, t, encoder_hidden_states=cond).sample.float()
        return F.mse_loss(e_n, e_0 - (e_c - e_0))

    def held(self):
        return list(self.unet.parameters()) + list(self.frozen.parameters())


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(variant, method, initial, plan, args, rank=0):
    """Train `plan` iterations; returns (seconds per iteration, held bytes, of which the pool's,
    cuda peak, losses, bytes of the delta or LoRA file's tensors)."""
    device = args.device
    dtype = load_sd.DTYPES[args.dtype]
    latent_shape = (4, args.latent, args.latent)
    # see the module docstring
    clock = time.perf_counter if device == "cuda" else time.process_time
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # The trainer: two diffusers copies, or ours (one UNet + the kept originals)
    if variant == "two copies (diffusers)":
        model = UNet2DConditionModel(**args.config)
        model.load_state_dict(initial)
        trainer = TwoCopies(model.to(device), method, args.steps, dtype)
        held = trainer.held()
    else:
        # rank > 0: the LoRA, whose trained tensors are not the UNet's
        model = UNet(configs.config_from_json(UNetConfig, args.config))
        model.load_state_dict(initial)
        trainer = esd.ESD(model.to(device), method, rank=rank, steps=args.steps, dtype=dtype)
        held = list(trainer.unet.parameters()) + list(trainer.originals.values())
        if rank:
            held += list(trainer.params.values())
    opt = torch.optim.Adam(trainer.params.values(), lr=1e-5)

    # Random stand-ins for the text conditionings
    g = torch.Generator().manual_seed(0)
    context_shape = (1, CONTEXT_LEN, args.config["cross_attention_dim"])
    uncond = torch.randn(context_shape, generator=g).to(device)
    cond = torch.randn(context_shape, generator=g).to(device)

    # "ours, pool": train.py's default x_t, its own draws (the same t_enc), its rebuilds timed in
    pool = None
    if variant == "ours, pool":
        pool = esd.TrajectoryPool(
            trainer, [cond], uncond, latent_shape, size=args.pool, refresh=args.refresh
        )

    losses = []
    seconds = []
    for it, (noise_seed, t_enc) in enumerate(plan):
        sync(device)
        start = clock()

        # x_t: sampled now with the weights being trained (the paper), or read from the pool
        if pool is not None:
            x_t = pool.draw(it)[2]
        else:
            generator = torch.Generator().manual_seed(noise_seed)
            x_T = torch.randn((1, *latent_shape), generator=generator).to(device)
            x_t = trainer.sample(x_T, cond, uncond, t_enc, xt_from="trained")

        # the loss and the step
        loss = trainer.loss(x_t, t_enc, cond, uncond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

        sync(device)
        seconds.append(clock() - start)
        losses.append(loss.item())

    # Held: the UNet and its frozen copy or originals, Adam's state, the grads, the pool
    states = [s for state in opt.state.values() for s in state.values() if torch.is_tensor(s)]
    grads = list(trainer.params.values())
    trajectories = [] if pool is None else [pool.paths]
    held_bytes = nbytes(held + states + grads + trajectories)
    pool_bytes = nbytes(trajectories)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    file_bytes = None
    if not isinstance(trainer, TwoCopies):
        file_bytes = nbytes(trainer.delta().values())
    return sum(seconds) / len(seconds), held_bytes, pool_bytes, peak, losses, file_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="float32",
        choices=load_sd.DTYPES,
        help="autocast compute dtype (weights stay fp32)",
    )
    p.add_argument(
        "--iters", type=int, default=None, help="training iterations per run (default: --refresh)"
    )
    p.add_argument(
        "--pool", type=int, default=DEFAULT.trajectory_pool, help="trajectories in the pool"
    )
    p.add_argument(
        "--refresh", type=int, default=DEFAULT.pool_refresh, help="pool rebuilt every R iterations"
    )
    p.add_argument(
        "--steps", type=int, default=esd.DDIM_STEPS, help="DDIM steps of the x_t trajectories"
    )
    p.add_argument("--latent", type=int, default=16, help="latent side (image side / 8)")
    p.add_argument("--methods", nargs="+", default=["esd-x", "esd-u"], choices=esd.FILTERS)
    p.add_argument(
        "--full", action="store_true", help="the full-size SD v1 UNet (859M parameters; for a GPU)"
    )
    p.add_argument("--lora", nargs="+", type=int, default=[4], help="ranks of the LoRA runs")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="the runs"
    )
    args = p.parse_args()
    args.config = FULL if args.full else CONFIG
    args.iters = args.iters or args.refresh or 6
    torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in UNet2DConditionModel(**args.config).state_dict().items()}

    # (noise seed, t_enc) of every iteration, for every run: train.py's stream of draws (seed 0,
    # one concept)
    plan = []
    for it in range(args.iters):
        _, t_enc, noise_seed = esd.draw(0, "iteration", it, 1, args.steps)
        plan.append((noise_seed, t_enc))

    n_params = sum(v.numel() for v in initial.values())
    layout = "SD v1 layout" if args.full else "SD v1 layout widths/5"
    print(
        f"{args.device} {args.dtype}, {layout}, {n_params:,} params, "
        f"latent {args.latent}x{args.latent}, {args.steps} DDIM steps, {args.iters} iterations, "
        f"t_enc {[t for _, t in plan]}, pool of {args.pool} rebuilt every {args.refresh}"
    )
    mib = 2**20
    kib = 2**10
    # Two UNets' weights alone: the least the official scripts hold
    two_unets = 2 * nbytes(initial.values())
    runs = []
    for key in args.variants:
        if key == "lora":
            runs += [(f"{VARIANTS[key]} {rank}", rank) for rank in args.lora]
        else:
            runs.append((VARIANTS[key], 0))

    for method in args.methods:
        results = {v: run(v, method, initial, plan, args, rank) for v, rank in runs}
        base = results.get(VARIANTS["two-copies"])
        trained = [v for n, v in initial.items() if esd.FILTERS[method](n)]
        full_delta = nbytes(trained)
        print(f"\n{method}: {sum(v.numel() for v in trained):,} trained params")
        for variant, (s, held, pool_bytes, peak, _, file_bytes) in results.items():
            line = f"  {variant:24s} {s:7.3f} s/it"
            if base:
                line += f" ({s / base[0]:.2f}x)"
            line += f"   held {held / mib:7.1f} MiB"
            if base:
                line += f" ({held / base[1]:.2f}x)"
            line += f" ({held / two_unets:.2f}x two UNets)"
            if peak is not None:
                line += f"   cuda peak {peak / mib:7.1f} MiB"
                if base:
                    line += f" ({peak / base[3]:.2f}x)"
            if file_bytes is not None:
                share = file_bytes / full_delta
                line += f"   file {file_bytes / mib:.2f} MiB ({share:.2%} of the delta)"
            if variant == VARIANTS["pool"]:
                line += f"   of which pool {pool_bytes / kib:.1f} KiB"
            print(line)

        # The same algorithm: ours against two copies; a LoRA starts as the full method (B = 0)
        ours = results.get(VARIANTS["ours"])
        if base and ours:
            gap = max(abs(a - b) / abs(b) for a, b in zip(ours[4], base[4]))
            print(f"  same algorithm: ours vs two-copies losses, max relative difference {gap:.1e}")
        for variant, result in results.items():
            if ours and variant.startswith(VARIANTS["lora"]):
                gap = abs(result[4][0] - ours[4][0]) / abs(ours[4][0])
                print(f"  {variant}: first loss vs ours, relative difference {gap:.1e}")


if __name__ == "__main__":
    main()
