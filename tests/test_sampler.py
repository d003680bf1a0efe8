"""sampler.py against closed-form DDIM values and against diffusers' DDIMScheduler (SD's config),
fp32, CPU."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import sampler
import tiny

STEPS = 10  # short loops keep the file fast; the step math does not depend on the count
B = 2


def scheduler(**overrides):
    return DDIMScheduler(**{**tiny.SCHEDULER, **overrides})


class CountingUNet:
    """A tiny random diffusers UNet as `unet(x, t, context)`, recording each batch size."""

    def __init__(self):
        self.unet = tiny.randomize(UNet2DConditionModel(**tiny.UNET_V1)).eval()
        self.batches = []

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CountingUNet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn((B, 4, 8, 8), generator=g)
    dim = tiny.UNET_V1["cross_attention_dim"]
    cond = torch.randn((B, 77, dim), generator=g)
    uncond = torch.randn((B, 77, dim), generator=g)
    return x_T, cond, uncond


@torch.no_grad()
def diffusers_loop(model, x_T, cond, uncond, guidance, eta=0.0, seed=None, **config):
    """StableDiffusionPipeline's denoising loop with DDIMScheduler; returns x after each
    step, x_T first."""
    sched = scheduler(**config)
    sched.set_timesteps(STEPS)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    xs = [x_T]
    for t in sched.timesteps:
        out = model(torch.cat([xs[-1]] * 2), t, torch.cat([uncond, cond]))
        eps_uncond, eps_cond = out.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        xs.append(sched.step(eps, t, xs[-1], eta=eta, generator=generator).prev_sample)
    return xs


def test_alphas_cumprod_matches_diffusers_and_closed_form():
    a = sampler.alphas_cumprod()
    assert a.dtype == torch.float32 and a.shape == (sampler.NUM_TRAIN_TIMESTEPS,)
    torch.testing.assert_close(a, scheduler().alphas_cumprod, rtol=0, atol=1e-7)
    # alpha_bar_0 = 1 - beta_0
    assert a[0].item() == pytest.approx(1 - sampler.BETA_START, abs=1e-7)
    # beta_999 = BETA_END
    assert (1 - a[-1] / a[-2]).item() == pytest.approx(sampler.BETA_END, abs=1e-6)


@pytest.mark.parametrize("steps", [1, 10, 25, 30, 50, 999])
def test_ddim_timesteps_match_diffusers_leading(steps):
    sched = scheduler()
    sched.set_timesteps(steps)
    assert torch.equal(sampler.ddim_timesteps(steps), sched.timesteps)


def test_ddim_timesteps_closed_form():
    assert sampler.ddim_timesteps(50).tolist() == list(range(981, 0, -20))
    assert sampler.ddim_timesteps(10).tolist() == list(range(901, 0, -100))
    sched = scheduler()
    sched.set_timesteps(1000)
    # diffusers would index past alphas_cumprod
    assert sched.timesteps[0] == sampler.NUM_TRAIN_TIMESTEPS
    with pytest.raises(ValueError):
        sampler.ddim_timesteps(1000)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(prediction, eta):
    sched = scheduler(prediction_type=prediction)
    sched.set_timesteps(50)
    a = sampler.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    ts = sampler.ddim_timesteps(50).tolist()
    # first, middle, and the last two (the last uses alphas_cumprod[0])
    for i in [0, 17, 48, 49]:
        x, out, noise = (torch.randn((B, 4, 8, 8), generator=g) for _ in range(3))
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else a[0]
        ours = sampler.ddim_step(x, out, a[ts[i]], a_prev, eta, noise, prediction)
        ref = sched.step(out, ts[i], x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_ddim_step_closed_form_eta0():
    # alpha_bar_t = 0.36, alpha_bar_prev = 0.64: sqrt(.36)=.6, sqrt(.64)=.8. x_0 = 1, eps = 0.5
    # gives x_t = .6*1 + .8*.5 = 1 (eq. 4); then x_prev = .8*1 + sqrt(1-.64)*.5 = 1.1 (eq. 12,
    # sigma=0).
    x_t = torch.tensor([1.0])
    eps = torch.tensor([0.5])
    v = torch.tensor([0.6 * 0.5 - 0.8 * 1.0])
    a_t = torch.tensor(0.36)
    a_prev = torch.tensor(0.64)
    torch.testing.assert_close(sampler.ddim_step(x_t, eps, a_t, a_prev), torch.tensor([1.1]))
    from_v = sampler.ddim_step(x_t, v, a_t, a_prev, prediction="v_prediction")
    torch.testing.assert_close(from_v, torch.tensor([1.1]))
    with pytest.raises(ValueError):
        sampler.ddim_step(x_t, eps, a_t, a_prev, prediction="sample")


def test_ddim_step_eta1_is_ddpm_posterior():
    # eta = 1 makes DDIM's process Markovian (paper, below eq. 16): x_prev ~ q(x_prev | x_t,
    # x0_pred), the DDPM posterior (arXiv 2006.11239 eq. 7) with alpha = a_t / a_prev,
    # beta = 1 - alpha.
    a_t, a_prev = 0.3, 0.7
    alpha = a_t / a_prev
    beta = 1 - a_t / a_prev
    x_t = torch.tensor([0.9], dtype=torch.float64)
    eps = torch.tensor([-0.4], dtype=torch.float64)
    z = torch.ones(1)
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = (
        math.sqrt(a_prev) * beta / (1 - a_t) * x0
        + math.sqrt(alpha) * (1 - a_prev) / (1 - a_t) * x_t
    )
    var = (1 - a_prev) / (1 - a_t) * beta  # beta tilde
    torch.testing.assert_close(sampler.ddim_step(x_t, eps, a_t, a_prev, 1.0, 0 * z), mean)
    with_noise = sampler.ddim_step(x_t, eps, a_t, a_prev, 1.0, z)
    torch.testing.assert_close(with_noise, mean + math.sqrt(var))


def test_cfg_formula():
    u = torch.tensor([1.0, -2.0])
    c = torch.tensor([3.0, 0.0])
    # u + 7.5 (c - u)
    torch.testing.assert_close(sampler.cfg(u, c, 7.5), torch.tensor([16.0, 13.0]))
    torch.testing.assert_close(sampler.cfg(u, c, 1.0), c)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sample_with_cfg_matches_diffusers_loop_in_one_batched_call(model, inputs, eta):
    x_T, cond, uncond = inputs
    ref = diffusers_loop(model, x_T, cond, uncond, 7.5, eta, seed=3)
    model.batches.clear()
    rng = torch.get_rng_state()
    ours = sampler.sample(
        model,
        x_T,
        cond,
        uncond,
        steps=STEPS,
        guidance=7.5,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
    )
    assert model.batches == [2 * B] * STEPS  # uncond and cond in ONE call per step
    assert torch.equal(torch.get_rng_state(), rng)  # all randomness came from `generator`
    torch.testing.assert_close(ours, ref[-1], rtol=1e-5, atol=1e-5)
    assert (ours - x_T).abs().max() > 0.1  # the loop really moved x


def test_partial_sampling_stops_at_step_k(model, inputs):
    x_T, cond, uncond = inputs
    ref = diffusers_loop(model, x_T, cond, uncond, 7.5)
    for k in [0, 1, 4, STEPS]:
        model.batches.clear()
        x_k = sampler.sample(model, x_T, cond, uncond, steps=STEPS, until=k)
        assert len(model.batches) == k
        # x at ddim_timesteps(STEPS)[k]
        torch.testing.assert_close(x_k, ref[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(sampler.sample(model, x_T, cond, uncond, steps=STEPS, until=0), x_T)
    with pytest.raises(ValueError):
        sampler.sample(model, x_T, cond, uncond, steps=STEPS, until=STEPS + 1)


def test_no_guidance_calls_unet_on_cond_only(model, inputs):
    x_T, cond, uncond = inputs
    ref = diffusers_loop(model, x_T, cond, uncond, 1.0)  # guidance 1: eps = eps_cond
    for kwargs in [dict(uncond=uncond, guidance=1.0), dict(uncond=None)]:
        model.batches.clear()
        ours = sampler.sample(model, x_T, cond, steps=STEPS, **kwargs)
        assert model.batches == [B] * STEPS
        torch.testing.assert_close(ours, ref[-1], rtol=1e-5, atol=1e-5)


def test_v_prediction_loop_matches_diffusers(model, inputs):
    x_T, cond, uncond = inputs
    ref = diffusers_loop(model, x_T, cond, uncond, 7.5, prediction_type="v_prediction")
    ours = sampler.sample(model, x_T, cond, uncond, steps=STEPS, prediction="v_prediction")
    torch.testing.assert_close(ours, ref[-1], rtol=1e-5, atol=1e-5)
    eps_ours = sampler.sample(model, x_T, cond, uncond, steps=STEPS)
    assert (ours - eps_ours).abs().max() > 1e-2  # the prediction type matters
