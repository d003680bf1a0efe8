"""DDIM sampling for Stable Diffusion: SD's noise schedule, the DDIM update, classifier-free
guidance, a sampling loop that can stop part-way and give every step's x (ESD needs x_t after
t_enc steps), and prompts x seeds -> images with any loaded model.

DDIM: Song et al., arXiv 2010.02502, eq. 12 (the update) and eq. 16 (sigma_t from eta); the
paper's alpha_t is DDPM's alpha_bar_t, the cumulative product, and that is the name used here.
v-prediction: Salimans & Ho, arXiv 2202.00512, sec. 4. Guidance: Ho & Salimans, arXiv 2207.12598,
eq. 6. Mirrors LDM's DDIMSampler,
CompVis/stable-diffusion@21f890f9da3c ldm/models/diffusion/ddim.py
"""

import torch
from tqdm import tqdm

# SD's schedule, LDM configs/stable-diffusion/v1-inference.yaml: timesteps, linear_start,
# linear_end.
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
# what the UNet outputs: eps (SD v1, v2-base) or v (SD v2 768)
PREDICTIONS = ("epsilon", "v_prediction")


def betas(dtype=torch.float32):
    """beta_t for t = 0..999: "scaled_linear", linear in sqrt(beta) (LDM's "linear" schedule)."""
    return torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=dtype) ** 2


def alphas_cumprod():
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for t = 0..999, float32 [1000]. Computed in float32
    as diffusers does (LDM computes in float64, then stores float32: they differ by <= 5e-7)."""
    return torch.cumprod(1.0 - betas(), dim=0)


def ddim_timesteps(steps):
    """The `steps` timesteps DDIM visits, descending: LDM's "uniform" spacing plus 1 (50 -> 981,
    961, ..., 1), diffusers' DDIMScheduler "leading" spacing with steps_offset=1."""
    # 1000 steps would start at t = 1000, past the schedule's end
    if not 1 <= steps < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TRAIN_TIMESTEPS - 1}, got {steps}")
    stride = NUM_TRAIN_TIMESTEPS // steps
    # +1: LDM's offset, so the last step lands on t=1
    return (torch.arange(steps) * stride + 1).flip(0)


def ddim_step(
    x_t, model_out, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None, prediction="epsilon"
):
    """One DDIM update x_t -> x_prev (eq. 12). `model_out` is eps or v (per `prediction`);
    `noise` ~ N(0, I) shaped like x_t is needed only when eta > 0."""
    if prediction == "epsilon":
        eps = model_out
        # eq. 12, "predicted x_0"
        x0_pred = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    elif prediction == "v_prediction":
        # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, solved for x_0 and eps
        x0_pred = alpha_bar_t**0.5 * x_t - (1 - alpha_bar_t) ** 0.5 * model_out
        eps = alpha_bar_t**0.5 * model_out + (1 - alpha_bar_t) ** 0.5 * x_t
    else:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    # eq. 16: sigma_t = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
    #                       * sqrt(1 - alpha_bar_t / alpha_bar_prev)
    sigma_t = (
        eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    )
    dir_xt = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps  # eq. 12, "direction pointing to x_t"
    x_prev = alpha_bar_prev**0.5 * x0_pred + dir_xt  # eq. 12 without its random term
    if eta > 0:
        x_prev = x_prev + sigma_t * noise  # eq. 12, random term sigma_t * eps_t
    return x_prev


def cfg(eps_uncond, eps_cond, scale):
    """Classifier-free guidance: eps_uncond + scale * (eps_cond - eps_uncond). Ho & Salimans eq. 6
    writes (1 + w) eps_cond - w eps_uncond; scale = 1 + w (scale 1: no guidance)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cat(conds):
    """Conditionings joined along the batch: contexts, or tuples (SDXL's (context, added))
    elementwise; [c] * n: n rows."""
    if isinstance(conds[0], tuple):
        return tuple(map(torch.cat, zip(*conds)))
    return torch.cat(conds)


def inputs(cond):
    """A conditioning as the UNet's arguments after x and t: (context,); SDXL's as it is."""
    return cond if isinstance(cond, tuple) else (cond,)


@torch.no_grad()
def sample(
    unet,
    x_T,
    cond,
    uncond=None,
    *,
    steps=50,
    guidance=7.5,
    eta=0.0,
    prediction="epsilon",
    generator=None,
    until=None,
    trajectory=False,
    progress=False,
):
    """Run DDIM from noise x_T [B,4,h,w] and return the latents.

    unet(x, t, *inputs(c)) -> eps or v; cond, uncond: conditionings (text contexts [B,77,D], or
    tuples). With uncond given and guidance != 1, the UNet sees [uncond; cond] as ONE batch of 2B
    per step. until=k stops after k steps and returns x at timestep ddim_timesteps(steps)[k] (k=0:
    x_T itself). trajectory=True returns every step's x instead, [until + 1, B, 4, h, w]: x after
    0, 1, ..., until steps. eta > 0 draws its noise from `generator` (on the generator's device,
    then moved, as diffusers does).
    """
    timesteps = ddim_timesteps(steps)
    until = steps if until is None else until
    if not 0 <= until <= steps:
        raise ValueError(f"until must be in 0..{steps}, got {until}")
    alpha_bar = alphas_cumprod()
    guided = uncond is not None and guidance != 1
    context = cat([uncond, cond]) if guided else cond

    x = x_T
    xs = [x_T]
    for i in tqdm(range(until), disable=not progress, desc="DDIM"):
        # a python int: valid on any device the UNet runs on
        t = int(timesteps[i])
        # The step after the last has no timestep: its alpha_bar_prev is alphas_cumprod[0], as in
        # LDM and in diffusers with set_alpha_to_one=False (SD's scheduler config), not 1.
        alpha_bar_prev = alpha_bar[timesteps[i + 1]] if i + 1 < steps else alpha_bar[0]

        # guided: the UNet on [uncond; cond], 2B, then (2B, 4, h, w) -> 2 x (B, ...)
        model_out = unet(torch.cat([x, x]) if guided else x, t, *inputs(context))
        if guided:
            model_out = cfg(*model_out.chunk(2), guidance)

        noise = None
        if eta > 0:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            noise = noise.to(x.device)

        x = ddim_step(x, model_out, alpha_bar[t], alpha_bar_prev, eta, noise, prediction)
        if trajectory:
            xs.append(x)
    return torch.stack(xs) if trajectory else x


def initial_noise(seed, latent_shape):
    """Seed s's noise [1, 4, h, w] (docs/design.md, "Data flow"): drawn on the CPU, as a diffusers
    pipeline given torch.Generator("cpu").manual_seed(s) draws it for one image, so every device
    sees the same numbers."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *latent_shape), generator=generator)


@torch.no_grad()
def generate(
    sd,
    prompts,
    seeds,
    *,
    negative_prompt="",
    steps=50,
    guidance=7.5,
    height=512,
    width=512,
    batch_size=None,
    progress=False,
):
    """Images [len(seeds) * len(prompts), 3, H, W] in [-1, 1] of a loaded model `sd`, seed-major:
    image (s, p) starts from seed s's noise. Batches of `batch_size` images (default: one
    seed's prompts)."""
    param = next(sd.unet.parameters())
    pairs = [(seed, prompt) for seed in seeds for prompt in prompts]
    batch_size = batch_size or len(prompts)
    # (SDXL: the image size is conditioning too)
    uncond = sd.encode_prompts([negative_prompt], (height, width))

    images = []
    for i in range(0, len(pairs), batch_size):
        batch_seeds, batch_prompts = zip(*pairs[i : i + batch_size])
        x_T = torch.cat([initial_noise(s, sd.latent_shape(height, width)) for s in batch_seeds])
        latents = sample(
            sd.unet,
            x_T.to(param.device, param.dtype),
            sd.encode_prompts(batch_prompts, (height, width)),
            cat([uncond] * len(x_T)),
            steps=steps,
            guidance=guidance,
            prediction=sd.prediction_type,
            progress=progress,
        )
        images.append(sd.decode_latents(latents).clamp(-1, 1).float().cpu())
    return torch.cat(images)
