"""ESD training cost: esd.ESD (one UNet + kept originals of the trained tensors, frozen predictions
by functional_call) against the straightforward two-copies implementation both official scripts
use (a diffusers UNet being trained and a deepcopy of it as the frozen model), same algorithm,
same weights, same seeds and t_enc sequence, x_t sampled every iteration (the paper). Also ours with
train.py's default x_t, an on-policy trajectory pool (esd.XtSource: N trajectories from the model being
trained, rebuilt every R iterations; --iters defaults to R, so the rebuild is in the average): seconds per
iteration are then seconds to the same number of x_t samples. Prints seconds per iteration, memory and
ratios to the two-copies run.

Time: on a GPU wall-clock seconds; on the CPU process CPU seconds with one thread, which a machine
shared with other jobs inflates far less than wall-clock time.
Memory: bytes of the tensors each run holds (UNet parameters, frozen copy or kept originals, grads,
Adam state, pool); on a GPU also torch.cuda.max_memory_allocated (activations included).

    python bench/bench_esd.py [--device cuda] [--dtype bfloat16] [--iters R] [--pool N] [--refresh R] [--latent 16] [--full]
"""

import argparse
import copy
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from diffusers import UNet2DConditionModel  # noqa: E402  (test/benchmark-only oracle)

import configs  # noqa: E402
import esd  # noqa: E402
import load_sd  # noqa: E402
import sampler  # noqa: E402
import train  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402

CONTEXT_LEN = 77  # CLIP text tokens
# SD v1 layout (runwayml/stable-diffusion-v1-5 unet/config.json) with every width / 5, the text width
# (768) included, so each filter keeps about SD v1's share of the parameters (ESD-x ~5%).
CONFIG = dict(
    block_out_channels=[64, 128, 256, 256],
    cross_attention_dim=160,
    attention_head_dim=8,
    layers_per_block=2,
)
FULL = dict(
    CONFIG, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768
)  # SD v1 itself (--full)
DEFAULT = train.TrainConfig()  # its trajectory_pool and pool_refresh: train.py's default x_t


class TwoCopies:
    """The straightforward ESD: train a diffusers UNet, frozen predictions from a deepcopy of it."""

    def __init__(self, unet, method, steps, dtype):
        self.unet = unet.eval().requires_grad_(False)
        self.frozen = copy.deepcopy(unet)
        self.params = {n: p for n, p in unet.named_parameters() if esd.FILTERS[method](n)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.steps, self.timesteps = steps, sampler.ddim_timesteps(steps)
        device = next(unet.parameters()).device.type
        self.autocast = lambda: torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def x_t(self, x_T, cond, uncond, t_enc):  # from the model being trained, as train-esd.py
        with torch.no_grad(), self.autocast():
            return sampler.sample(
                lambda x, t, c: self.unet(x, t, encoder_hidden_states=c).sample,
                x_T,
                cond,
                uncond,
                steps=self.steps,
                guidance=esd.GUIDANCE,
                until=t_enc,
            )

    def loss(self, x_t, t_enc, cond, uncond):
        t = int(self.timesteps[t_enc])
        with torch.no_grad(), self.autocast():  # two calls, as both official scripts
            e_0 = self.frozen(x_t, t, encoder_hidden_states=uncond).sample.float()
            e_c = self.frozen(x_t, t, encoder_hidden_states=cond).sample.float()
        with self.autocast():
            e_n = self.unet(x_t, t, encoder_hidden_states=cond).sample.float()
        return F.mse_loss(e_n, e_0 - (e_c - e_0))

    def held(self):
        return list(self.unet.parameters()) + list(self.frozen.parameters())


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def run(variant, method, initial, plan, args):
    """Train `plan` iterations; returns (seconds per iteration, held bytes, cuda peak, losses)."""
    device, dtype = args.device, load_sd.DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.process_time  # see the module docstring
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if variant == "two copies (diffusers)":
        model = UNet2DConditionModel(**args.config)
        model.load_state_dict(initial)
        trainer = TwoCopies(model.to(device), method, args.steps, dtype)
        x_t, held = trainer.x_t, trainer.held
    else:
        model = UNet(configs.config_from_json(UNetConfig, args.config))
        model.load_state_dict(initial)
        trainer = esd.ESD(model.to(device), method, steps=args.steps, dtype=dtype)
        x_t = lambda *a: trainer.sample(*a, xt_from="trained")  # noqa: E731
        held = lambda: list(trainer.unet.parameters()) + list(trainer.originals.values())  # noqa: E731
    opt = torch.optim.Adam(trainer.params.values(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    uncond, cond = (
        torch.randn(1, CONTEXT_LEN, args.config["cross_attention_dim"], generator=g).to(device)
        for _ in range(2)
    )
    noise = lambda seed: torch.randn(
        (1, 4, args.latent, args.latent),  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
    ).to(device)
    source = esd.XtSource(
        trainer, [cond], uncond, (4, args.latent, args.latent), pool=args.pool, refresh=args.refresh
    )
    losses, seconds = [], []
    for it, (seed, t_enc) in enumerate(plan):
        sync()
        start = clock()
        if variant == "ours, pool":  # the pool's own draws: the same t_enc, its rebuilds timed in
            x = source.draw(it)[2]
        else:
            x = x_t(noise(seed), cond, uncond, t_enc)
        loss = trainer.loss(x, t_enc, cond, uncond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        seconds.append(clock() - start)
        losses.append(loss.item())
    states = [s for state in opt.state.values() for s in state.values() if torch.is_tensor(s)]
    pool = [trajectory for _, trajectory in getattr(source, "trajectories", [])]
    held_bytes = nbytes(
        held() + states + [p for p in trainer.params.values()] + pool[:1]
    )  # + grads; pool: one batch
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return sum(seconds) / len(seconds), held_bytes, peak, losses


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
    args = p.parse_args()
    args.config = FULL if args.full else CONFIG
    args.iters = args.iters or args.refresh or 6
    torch.set_num_threads(1)
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in UNet2DConditionModel(**args.config).state_dict().items()}
    draws = esd.XtSource(
        SimpleNamespace(steps=args.steps), [None], None, None
    )  # train.py's stream of draws
    plan = [
        draws._draw("iteration", it)[2:0:-1] for it in range(args.iters)
    ]  # (noise seed, t_enc), every run
    n_params = sum(v.numel() for v in initial.values())
    print(
        f"{args.device} {args.dtype}, SD v1 layout{'' if args.full else ' widths/5'}, {n_params:,} params, "
        f"latent {args.latent}x{args.latent}, {args.steps} DDIM steps, {args.iters} iterations, "
        f"t_enc {[t for _, t in plan]}, pool of {args.pool} rebuilt every {args.refresh}"
    )
    mib = 2**20
    for method in args.methods:
        results = {
            v: run(v, method, initial, plan, args)
            for v in ("two copies (diffusers)", "ours", "ours, pool")
        }
        base_s, base_held, base_peak, base_losses = results["two copies (diffusers)"]
        trained = sum(p.numel() for n, p in initial.items() if esd.FILTERS[method](n))
        print(f"\n{method}: {trained:,} trained params")
        for variant, (s, held, peak, _) in results.items():
            line = (
                f"  {variant:24s} {s:7.3f} s/it ({s / base_s:.2f}x)"
                f"   held {held / mib:7.1f} MiB ({held / base_held:.2f}x)"
            )
            if peak is not None:
                line += f"   cuda peak {peak / mib:7.1f} MiB ({peak / base_peak:.2f}x)"
            print(line)
        ours_losses = results["ours"][3]
        gap = max(abs(a - b) / abs(b) for a, b in zip(ours_losses, base_losses))
        print(f"  same algorithm: ours vs two-copies losses, max relative difference {gap:.1e}")


if __name__ == "__main__":
    main()
