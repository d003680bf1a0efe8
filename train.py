"""train.py: erase a concept from Stable Diffusion with ESD (arXiv 2303.07345, Algorithm 1).

    python train.py --concept "car"                           # ESD-x on SD v1.4 from the hub (GPU)
    python train.py --model toy --concept circle              # the shipped toy model, CPU, minutes
    python train.py --concept "Van Gogh" --method esd-u --negative-guidance 1 --iterations 1000

Writes a delta (.safetensors holding only the trained tensors, diffusers UNet names) that
`sample.py --delta` applies; optionally the whole edited model as an official single file.
"""
import argparse
import dataclasses
import os
import random
import sys

import torch
from tqdm import tqdm

import esd
import load_sd


def opt(default, help, **argparse_kw):
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclasses.dataclass
class TrainConfig:  # every field is a command-line flag: --negative-guidance for negative_guidance
    model: str = opt("CompVis/stable-diffusion-v1-4", "single file, diffusers folder, hub id, or 'toy'")
    tokenizer: str = opt(None, "tokenizer folder or hub id, for single-file models")
    concept: str = opt(None, "what to erase; 'a, b' erases both (one drawn per iteration)")
    method: str = opt("esd-x", "which weights train (esd.py FILTERS)", choices=list(esd.FILTERS))
    loss: str = opt("esd", "target of the trained prediction (esd.py TARGETS)", choices=list(esd.TARGETS))
    negative_guidance: float = opt(1.0, "eta in e_0 - eta (e_c - e_0)")
    erase_from: str = opt(None, "anchor concept: erase the concept from its images (implies --loss anchor)")
    xt_from: str = opt("trained", "weights that sample x_t: the model being trained (paper) or the frozen one",
                       choices=list(esd.XT_FROM))
    trajectory_pool: int = opt(0, "reuse N sampled x_t trajectories instead of sampling every iteration (0: off)")
    pool_refresh: int = opt(0, "re-sample the pool every R iterations (0: never; use with --xt-from trained)")
    iterations: int = opt(1000, "optimizer steps")
    batch_size: int = opt(1, "x_t per step, all at one t_enc (the paper: 1; more: a steadier gradient)")
    lr: float = opt(1e-5, "Adam learning rate")
    seed: int = opt(0, "seeds the concept, t_enc and noise of every iteration")
    ddim_steps: int = opt(esd.DDIM_STEPS, "DDIM steps of the x_t trajectories")
    resolution: int = opt(512, "image side in pixels (latents are resolution / 8)")
    start_guidance: float = opt(esd.START_GUIDANCE, "CFG scale while sampling x_t")
    device: str = opt("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    dtype: str = opt("float32", "autocast compute dtype; trained weights stay float32", choices=list(load_sd.DTYPES))
    output: str = opt(None, "delta file (default: <method>-<concept>.safetensors, e.g. esd-x-car.safetensors)")
    save_every: int = opt(0, "also checkpoint every N iterations (0: only at the end)")
    resume: bool = opt(False, "continue from --output and its .resume.pt checkpoint", action="store_true")
    export_full: str = opt(None, "also write the edited model as an official single file (.safetensors)")
    export_diffusers: str = opt(None, "also write the edited model as a diffusers folder")
    no_eval: bool = opt(False, "toy model: skip the erasure measurement at the end", action="store_true")


# The toy model (assets/toy, 32 px) trains with these unless a flag says otherwise; see README for measurements.
TOY_DEFAULTS = dict(resolution=32, ddim_steps=20, lr=1e-3, iterations=300, start_guidance=3.0, device="cpu")


def parse_args(argv=None):
    """TrainConfig from the command line: typed flags, toy defaults under flags the user gave."""
    p = argparse.ArgumentParser(description="Erase a concept from Stable Diffusion with ESD.")
    for f in dataclasses.fields(TrainConfig):
        kind = {} if "action" in f.metadata else {"type": f.type}  # typed: "--lr 1e-5" is a float
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       **kind, **dict(f.metadata, help=f"{f.metadata['help']} (default: {f.default})"))
    given = vars(p.parse_args(argv))
    if "erase_from" in given:
        given.setdefault("loss", "anchor")
    toy = TOY_DEFAULTS if given.get("model") == "toy" else {}
    return TrainConfig(**{**toy, **given})


def check(cfg):
    """The concept list; LoadError (one line, exit 2) for settings no run could succeed with."""
    concepts = [c.strip() for c in (cfg.concept or "").split(",") if c.strip()]
    problems = [
        (not concepts, "--concept is required, e.g. --concept \"car\""),
        (min(cfg.iterations, cfg.batch_size) < 1 or cfg.lr <= 0 or not 1 <= cfg.ddim_steps < 1000,
         "--iterations, --batch-size, --lr, --ddim-steps out of range"),
        (cfg.resolution % 8 or cfg.resolution <= 0, "--resolution must be a positive multiple of 8"),
        (not abs(cfg.negative_guidance) < float("inf"), "--negative-guidance must be a finite number"),
        ((cfg.loss == "anchor") != (cfg.erase_from is not None), "--loss anchor and --erase-from go together"),
        (cfg.trajectory_pool < 0 or cfg.pool_refresh < 0 or cfg.save_every < 0, "negative counts are not allowed"),
        (cfg.device.startswith("cuda") and not torch.cuda.is_available(), "--device cuda, but no CUDA GPU is here"),
    ]
    for bad, message in problems:
        if bad:
            raise load_sd.LoadError(message)
    return concepts


def save(cfg, trainer, optimizer, iteration):
    """The delta (only trained tensors) and, beside it, what --resume needs; both atomic."""
    meta = dict(concept=cfg.concept, method=cfg.method, negative_guidance=cfg.negative_guidance,
                iterations=iteration, lr=cfg.lr, seed=cfg.seed, base_model=cfg.model, loss=cfg.loss)
    load_sd.save_delta(cfg.output, esd.delta_state_dict(trainer.unet, cfg.method), meta)
    state = {"iteration": iteration, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg)}
    load_sd.atomic_write(cfg.output + ".resume.pt", lambda tmp: torch.save(state, tmp))


def resume(cfg, trainer, optimizer):
    """The iteration to continue from, after restoring the trained tensors and Adam's state."""
    try:
        state = torch.load(cfg.output + ".resume.pt", weights_only=True)
        delta, _ = load_sd.load_delta(cfg.output)
    except (OSError, RuntimeError) as e:
        raise load_sd.LoadError(f"cannot resume from {cfg.output}: {str(e).splitlines()[0]}") from None
    same = ("model", "concept", "method", "loss", "negative_guidance", "erase_from", "seed", "ddim_steps", "resolution",
            "batch_size")
    changed = [k for k in same if state["config"][k] != getattr(cfg, k)]
    if changed:
        raise load_sd.LoadError(f"--resume with other settings than the checkpoint: {', '.join(changed)}")
    try:
        load_sd.apply_delta(trainer.unet, delta)
        optimizer.load_state_dict(state["optimizer"])
    except (load_sd.LoadError, ValueError) as e:  # a delta of other tensors, an optimizer of other shapes
        raise load_sd.LoadError(f"cannot resume from {cfg.output}: {e}") from None
    return state["iteration"]


def train(cfg, sd, concepts):
    """ESD's loop. Every iteration draws its concept, t_enc and noise from (seed, iteration) alone, so a
    resumed run repeats exactly what an uninterrupted one does."""
    trainer = esd.ESD(sd.unet, cfg.method, negative_guidance=cfg.negative_guidance, target=cfg.loss,
                      steps=cfg.ddim_steps, guidance=cfg.start_guidance, prediction=sd.prediction_type,
                      dtype=load_sd.DTYPES[cfg.dtype])
    tqdm.write(f"{cfg.method}: training {len(trainer.params)} tensors, "
               f"{sum(p.numel() for p in trainer.params.values()):,} parameters")
    optimizer = torch.optim.Adam(trainer.params.values(), lr=cfg.lr)
    uncond, *conds = sd.encode_prompts(["", *concepts]).split(1)  # text contexts, computed once
    anchor = sd.encode_prompts([cfg.erase_from]) if cfg.erase_from else None
    shape = sd.latent_shape(cfg.resolution, cfg.resolution)
    start = resume(cfg, trainer, optimizer) if cfg.resume else 0
    batch = lambda context: context.expand(cfg.batch_size, -1, -1)  # [1, 77, D] -> [batch_size, 77, D]

    def draw(it, stream="iteration", n=cfg.batch_size):  # (concept index, t_enc, x_T [n]) of iteration or pool entry `it`
        rng = random.Random(f"{cfg.seed}/{stream}/{it}")  # x_T[:1] is the same for every n
        noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(rng.getrandbits(62)))
        return rng.randrange(len(concepts)), rng.randrange(cfg.ddim_steps), noise.to(cfg.device)

    pool = []  # (concept index, trajectory [steps, 1, 4, h, w]) when --trajectory-pool N
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="ESD")
    for it in bar:
        if cfg.trajectory_pool and (not pool or cfg.pool_refresh and it % cfg.pool_refresh == 0):
            refresh = it // cfg.pool_refresh if cfg.pool_refresh else 0
            draws = [draw(i, f"pool{refresh}", n=1) for i in range(cfg.trajectory_pool)]
            pool = [(c, trainer.trajectory(x_T, anchor if anchor is not None else conds[c], uncond, cfg.xt_from))
                    for c, _, x_T in draws]
        c, t_enc, x_T = draw(it)
        cs = [c] * cfg.batch_size
        if pool:  # batch_size consecutive pool entries, each with its own concept
            cs, trajectories = zip(*(pool[(it * cfg.batch_size + j) % len(pool)] for j in range(cfg.batch_size)))
            x_t = torch.cat([trajectory[t_enc] for trajectory in trajectories])
        else:  # x_t shows the anchor's images when erasing from it
            x_t = trainer.x_t(x_T, batch(anchor if anchor is not None else conds[c]), batch(uncond), t_enc, cfg.xt_from)
        loss = trainer.loss(x_t, t_enc, torch.cat([conds[c] for c in cs]), batch(uncond),
                            None if anchor is None else batch(anchor))
        if not torch.isfinite(loss):
            kept = f"the last checkpoint ({cfg.output}) is kept" if os.path.exists(cfg.output) else "nothing saved"
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}; {kept}. Try a lower --lr.")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}", concept=concepts[cs[0]])
        if cfg.save_every and (it + 1) % cfg.save_every == 0 and it + 1 < cfg.iterations:
            save(cfg, trainer, optimizer, it + 1)
    save(cfg, trainer, optimizer, cfg.iterations)
    return trainer


def main(argv=None):
    cfg = parse_args(argv)
    try:
        concepts = check(cfg)
        slug = "-".join("".join(ch if ch.isalnum() else "_" for ch in c) for c in concepts)
        cfg.output = cfg.output or f"{cfg.method}-{slug}.safetensors"
        if not os.access(os.path.dirname(os.path.abspath(cfg.output)), os.W_OK):
            raise load_sd.LoadError(f"cannot write {cfg.output}: its folder is missing or read-only")
        sd = load_sd.load(cfg.model, tokenizer=cfg.tokenizer, device=cfg.device)
        train(cfg, sd, concepts)
        tqdm.write(f"wrote {cfg.output}")
        if cfg.export_full:
            load_sd.save_single_file(sd, cfg.export_full, {"esd": f"{cfg.method} {cfg.concept}"})
            tqdm.write(f"wrote {cfg.export_full}")
        if cfg.export_diffusers:
            load_sd.save_diffusers(sd, cfg.export_diffusers)
            tqdm.write(f"wrote {cfg.export_diffusers}")
        if cfg.model == "toy" and not cfg.no_eval:
            import evaluate  # the toy's measurement: erased-concept rate before and after
            print(evaluate.format_report(evaluate.evaluate(load_sd.load("toy"), cfg.output, concepts[0])))
    except load_sd.LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the last checkpoint (--save-every) is kept: continue it with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
