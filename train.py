"""train.py: erase a concept from Stable Diffusion with ESD (arXiv 2303.07345, Algorithm 1).

    python train.py --concept "car"               # ESD-x on SD v1.4 from the hub (GPU)
    python train.py --model toy --concept circle  # the shipped toy model, CPU, minutes
    python train.py --concept "Van Gogh" --method esd-u --negative-guidance 1 --iterations 1000

Writes a delta (.safetensors of the trained tensors only, diffusers UNet names) for
`sample.py --delta`; with --lora RANK a LoRA file (kohya's layout: A1111, ComfyUI, diffusers)."""

import argparse
import dataclasses
import os
import sys

import torch
from tqdm import tqdm

import cli
import configs
import delta
import esd
import evaluate
import files
import load_sd
import lora
import sampler
import toy


def opt(default, help, **argparse_kw):
    """A TrainConfig field: its default, and its flag's help and argparse keywords."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kw))


# Every field is a command-line flag: --negative-guidance for negative_guidance. The model flags'
# help and choices are cli.py's, shared with sample.py, evaluate.py and app.py.
@dataclasses.dataclass
class TrainConfig:
    model: str = opt(**cli.model_flag("model", default="CompVis/stable-diffusion-v1-4"))
    tokenizer: str = opt(**cli.model_flag("tokenizer"))
    revision: str = opt(**cli.model_flag("revision"))
    variant: str = opt(**cli.model_flag("variant"))
    prediction_type: str = opt(**cli.model_flag("prediction_type"))
    concept: str = opt(None, "what to erase; 'a, b' erases both (one drawn per iteration)")
    method: str = opt(
        "esd-x",
        "which weights train: " + "; ".join(f"{k}, {v}" for k, v in esd.METHODS.items()),
        choices=list(esd.FILTERS),
    )
    target: str = opt("esd", "what the trained prediction is pulled toward (esd.py TARGETS)")
    negative_guidance: float = opt(1.0, "the paper's η in e_0 - η (e_c - e_0)")
    erase_from: str = opt(
        None, "anchor concept a: erase the concept from a's images (target base e_a)"
    )
    xt_from: str = opt(
        "trained",
        "weights that sample x_t: the model being trained (paper) or the frozen one",
        choices=list(esd.XT_FROM),
    )
    trajectory_pool: int = opt(
        4, "x_t from N trajectories per batch row, re-sampled every R iterations (0: the paper)"
    )
    pool_refresh: int = opt(40, "R: re-sample the trajectory pool every R iterations (0: never)")
    lora: int = opt(
        None,
        "train a rank-R update W + (α/R)·B·A of the method's Linear and Conv2d modules "
        "instead of their weights; writes a LoRA file (kohya's layout)",
    )
    lora_alpha: float = opt(None, "α of --lora: the update is scaled by α/R (default: R)")
    iterations: int = opt(1000, "optimizer steps")
    batch_size: int = opt(
        1, "x_t per step, all at one t_enc (the paper: 1; more: a steadier gradient)"
    )
    lr: float = opt(1e-5, "Adam learning rate")
    seed: int = opt(0, "seeds the concept, t_enc and noise of every iteration")
    steps: int = opt(esd.DDIM_STEPS, "DDIM steps of the x_t trajectories")
    resolution: int = opt(
        0, "image side in pixels (0: the model's, e.g. 512 for SD v1, 1024 for SDXL)"
    )
    guidance: float = opt(esd.GUIDANCE, "classifier-free guidance scale while sampling x_t")
    device: str = opt(**cli.model_flag("device"))
    dtype: str = opt(**cli.model_flag("dtype"))
    output: str = opt(
        None, "delta file (default: <method>-<concept>.safetensors, e.g. esd-x-car.safetensors)"
    )
    save_every: int = opt(0, "also checkpoint every N iterations (0: only at the end)")
    resume: bool = opt(
        False, "continue from --output and its .resume.pt checkpoint", action="store_true"
    )
    export_full: str = opt(
        None, "also write the edited model as an official single file (.safetensors)"
    )
    export_dtype: str = opt(
        None,
        "the dtype of --export-full's tensors (default: the model file's own, e.g. float16)",
        choices=list(load_sd.DTYPES),
    )
    export_diffusers: str = opt(None, "also write the edited model as a diffusers folder")
    overwrite: bool = opt(
        False, "replace an existing --output (and --export-full)", action="store_true"
    )
    no_eval: bool = opt(
        False, "toy model: skip the erasure measurement at the end", action="store_true"
    )


# The settings every iteration depends on: --resume refuses a checkpoint made with others.
RESUME_SAME = (
    "model",
    "prediction_type",
    "concept",
    "method",
    "lora",
    "lora_alpha",
    "target",
    "negative_guidance",
    "erase_from",
    "xt_from",
    "trajectory_pool",
    "pool_refresh",
    "batch_size",
    "lr",
    "seed",
    "steps",
    "resolution",
    "guidance",
)


def parse_args(argv=None):
    """TrainConfig from the command line: typed flags, the toy's defaults (toy.ESD) under the flags
    the user gave."""
    p = cli.ArgumentParser(description="Erase a concept from Stable Diffusion with ESD.")
    for f in dataclasses.fields(TrainConfig):
        # Typed: "--lr 1e-5" is a float.
        kind = {} if "action" in f.metadata else {"type": f.type}
        help = f"{f.metadata['help']} (default: {f.default})"
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            default=argparse.SUPPRESS,
            **kind,
            **dict(f.metadata, help=help),
        )
    given = vars(p.parse_args(argv))
    defaults = toy.ESD if given.get("model") == "toy" else {}
    return TrainConfig(**{**defaults, **given})


def check(config):
    """The concept list, after refusing (LoadError: one line, exit 2) every setting and output path
    no run could succeed with, before the model loads; sets the default --output."""
    concepts = cli.concepts(config.concept)
    cli.refuse(
        [
            (not concepts, '--concept is required, e.g. --concept "car"'),
            (
                config.target not in esd.TARGETS,
                f"--target must be one of: {', '.join(esd.TARGETS)}",
            ),
            # NaN compares false: refused.
            (not 0 < config.lr < float("inf"), "--lr must be a positive number"),
            (config.lora is not None and config.lora < 1, "--lora must be at least 1"),
            (config.lora_alpha is not None and not config.lora, "--lora-alpha needs --lora"),
            (
                config.lora_alpha is not None and not 0 < config.lora_alpha < float("inf"),
                "--lora-alpha must be a positive number",
            ),
            cli.finite("--negative-guidance", config.negative_guidance),
            cli.finite("--guidance", config.guidance),
            (
                min(config.iterations, config.batch_size) < 1,
                "--iterations and --batch-size must be at least 1",
            ),
            cli.steps("--steps", config.steps),
            cli.seed("--seed", config.seed),
            cli.side("--resolution", config.resolution, zero="the model's size"),
            (
                min(config.trajectory_pool, config.pool_refresh, config.save_every) < 0,
                "--trajectory-pool, --pool-refresh and --save-every cannot be negative",
            ),
        ]
    )

    # The outputs: the delta, its checkpoint, the exports; none of them an input.
    name = cli.output_name(concepts)
    if config.lora:
        name += f"-lora{config.lora}"
    config.output = config.output or f"{config.method}-{name}.safetensors"
    toy_files = load_sd.TOY_DIR if config.model == "toy" else None
    inputs = (config.model, config.tokenizer, toy_files)
    files.check_output(config.output, inputs=inputs, overwrite=config.overwrite or config.resume)
    files.check_output(config.output + ".resume.pt", inputs=inputs)
    files.check_output(config.export_full, inputs=inputs, overwrite=config.overwrite)
    files.check_output(config.export_diffusers, inputs=inputs, folder=True)
    return concepts


def save(config, sd, trainer, optimizer, xt_source, iteration):
    """The delta and, written first, what --resume needs: the trained tensors, Adam's state, the
    x_t pool, the settings. --lora: the LoRA file, with the metadata A1111 and ComfyUI read."""
    meta = dict(
        concept=config.concept,
        method=config.method,
        target=config.target,
        iterations=iteration,
        negative_guidance=config.negative_guidance,
        erase_from=config.erase_from or "",
        lr=config.lr,
        seed=config.seed,
        base_model=config.model,
    )
    if trainer.lora is not None:
        title = os.path.basename(config.output).removesuffix(".safetensors")
        spec = configs.model_spec(sd.family, sd.prediction_type, sd.image_size, title, "lora")
        meta.update(spec, **lora.metadata(trainer.lora, sd.family, config.model, iteration))
    state = {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "x_t pool": xt_source.state(),
        "config": dataclasses.asdict(config),
    }
    delta.save_checkpoint(config.output, trainer.delta(), meta, state)


def resume(config, trainer, optimizer, xt_source):
    """The iteration to continue from, after restoring the trained tensors, Adam's state and the
    pool from .resume.pt."""
    state = delta.load_checkpoint(config.output)
    changed = [k for k in RESUME_SAME if state.get("config", {}).get(k) != getattr(config, k)]
    if changed:
        raise files.LoadError(
            f"--resume with other settings than the checkpoint: {', '.join(changed)}"
        )
    if state["iteration"] > config.iterations:
        raise files.LoadError(
            f"--iterations {config.iterations}: the checkpoint is at iteration {state['iteration']}"
        )
    try:
        if trainer.lora is not None:
            trainer.lora.load(state["tensors"])
        else:
            delta.apply(trainer.unet, state["tensors"])
        optimizer.load_state_dict(state["optimizer"])
        xt_source.restore(state["x_t pool"])
    except (files.LoadError, ValueError, KeyError) as e:
        # Tensors of another model, an optimizer of other shapes.
        raise files.LoadError(
            f"cannot resume from {config.output}{delta.RESUME}: {files.first_line(e)}"
        ) from None
    return state["iteration"]


def train(config, sd, concepts, on_step=None, xt_source=None):
    """ESD (the paper's Algorithm 1) on `sd`'s UNet; returns its trainer.

    on_step(iteration, loss), if given, runs after every step (the demo's progress); when it
    returns True the run stops there, saved as it is. xt_source: a class to build the x_t source
    with instead of the one the config names in esd.XT_SOURCES ("pool" when --trajectory-pool > 0,
    else "paper"), called with the same arguments: e.g. a subclass of it. With --lora the update's
    hooks stay on sd.unet afterwards: trainer.lora.remove() takes them off."""
    # The UNet being trained and the originals of its trained tensors, or its low-rank update
    # (esd.py); a --lora rank a selected module cannot have is bad input.
    try:
        trainer = esd.ESD(
            sd.unet,
            config.method,
            rank=config.lora or 0,
            alpha=config.lora_alpha,
            negative_guidance=config.negative_guidance,
            target=config.target,
            steps=config.steps,
            guidance=config.guidance,
            prediction=sd.prediction_type,
            dtype=load_sd.DTYPES[config.dtype],
        )
    except ValueError as e:
        raise files.LoadError(f"--lora {config.lora}: {e}") from None
    n_params = sum(p.numel() for p in trainer.params.values())
    tqdm.write(f"{config.method}: training {len(trainer.params)} tensors, {n_params:,} parameters")

    # Adam over the trained tensors only
    optimizer = torch.optim.Adam(trainer.params.values(), lr=config.lr)

    # Conditionings, computed once: the empty prompt, each concept and the anchor (--erase-from).
    # size is (height, width): SDXL conditions on it too (text.py).
    size = (config.resolution or sd.image_size,) * 2
    uncond = sd.encode_prompts([""], size)
    conds = [sd.encode_prompts([concept], size) for concept in concepts]
    anchor = None
    if config.erase_from:
        anchor = sd.encode_prompts([config.erase_from], size)

    # Where x_t comes from: sampled every iteration (the paper) or an on-policy trajectory pool.
    # With an anchor, x_t shows the anchor's images.
    xt_conds = conds if anchor is None else [anchor] * len(conds)
    settings = dict(seed=config.seed, batch_size=config.batch_size, xt_from=config.xt_from)
    name = "paper"
    if config.trajectory_pool > 0:
        name = "pool"
        # N trajectories per batch row: a batch never reads one trajectory twice
        pool_size = config.trajectory_pool * config.batch_size
        settings.update(size=pool_size, refresh=config.pool_refresh)
    make_source = xt_source or esd.XT_SOURCES[name]
    source = make_source(trainer, xt_conds, uncond, sd.latent_shape(*size), **settings)

    # --resume: the trained tensors, Adam's state and the pool as the checkpoint left them
    start = 0
    if config.resume:
        start = resume(config, trainer, optimizer, source)

    bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="ESD")
    for it in bar:
        # Draw the iteration's concepts (indices into `concepts`) and DDIM step t_enc; x_t after
        # t_enc steps (sampled now, or a pool's)
        concept_indices, t_enc, x_t = source.draw(it)
        cond = sampler.cat([conds[i] for i in concept_indices])

        # Frozen e_0, e_c (one batch) -> target e_0 - η (e_c - e_0); the trained prediction's MSE
        loss = trainer.loss(x_t, t_enc, cond, uncond, anchor)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at iteration {it}: try a lower --lr or --negative-guidance"
            )

        # Backward, and step the trained tensors
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Progress; the demo's hook may stop the run here
        done = it + 1
        bar.set_postfix(loss=f"{loss.item():.4f}", concept=concepts[concept_indices[0]])
        stop = on_step is not None and on_step(done, loss.item())

        # Checkpoint every --save-every iterations, at the end, and where on_step stops the run
        periodic = config.save_every and done % config.save_every == 0
        if stop or done == config.iterations or periodic:
            save(config, sd, trainer, optimizer, source, done)
        if stop:
            break

    return trainer


def kept(config):
    """What a failed or stopped run leaves for --resume: its last checkpoint, if any."""
    try:
        state = delta.load_checkpoint(config.output, mmap=True)
    except files.LoadError:  # none yet
        return None
    # This run's checkpoint, not another's.
    if all(state["config"].get(k) == getattr(config, k) for k in RESUME_SAME):
        return (
            f"the checkpoint of iteration {state['iteration']} is kept ({config.output}): "
            "continue it with --resume"
        )


def main(argv=None):
    config = parse_args(argv)

    def work():
        concepts = check(config)
        with files.locked(config.output):
            # The weights in float32: train() computes in --dtype under autocast.
            sd = cli.load_model(config, dtype="float32")
            trainer = train(config, sd, concepts)

            # --lora: the exports hold the update merged into the weights
            if trainer.lora is not None:
                trainer.lora.remove()
                delta.apply(sd.unet, delta.weights(sd.unet, trainer.delta()))
            if config.export_full:
                meta = {"esd": f"{config.method} {config.concept}"}
                dtype = load_sd.DTYPES.get(config.export_dtype)
                load_sd.save_single_file(sd, config.export_full, meta, dtype)
            if config.export_diffusers:
                load_sd.save_diffusers(sd, config.export_diffusers)
        written = filter(None, (config.output, config.export_full, config.export_diffusers))
        tqdm.write("wrote " + ", ".join(written))

        # The toy's measurement: the erased-concept rate before and after.
        if config.model == "toy" and not config.no_eval:
            result = evaluate.evaluate(load_sd.load("toy"), config.output, concepts[0])
            print(evaluate.format_report(result))

    resolution = config.resolution or "the model size"
    smaller = f"--resolution (now {resolution}) or --batch-size (now {config.batch_size})"
    return cli.run_cli(work, leftover=lambda: kept(config), smaller=smaller)


if __name__ == "__main__":
    sys.exit(main())
