"""vae.py against diffusers' AutoencoderKL (the oracle), fp32 on CPU: same random weights loaded by
identity give the same posterior and decoded image; key sets equal at tiny and full SD size
(meta)."""

import copy
import json
from dataclasses import fields

import pytest
import torch
from diffusers import AutoencoderKL

import configs
import tiny
from vae import VAE, VAEConfig

# tests/fixtures/README.md: first_stage_model.* scalars of SD v1
SD_VAE_PARAMS = 83_653_863
# stable-diffusion-v1-5 vae/config.json (diffusers' AutoencoderKL keys)
SD_DIFFUSERS = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    sample_size=512,
)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pair():
    ref = tiny.randomize(AutoencoderKL(**tiny.VAE)).eval()
    ours = VAE(configs.config_from_json(VAEConfig, tiny.VAE)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_state_dict_keys_and_shapes_equal_diffusers():
    ours = VAE(configs.config_from_json(VAEConfig, tiny.VAE))
    assert shapes(ours) == shapes(AutoencoderKL(**tiny.VAE))


@pytest.mark.parametrize("hw", [(16, 16), (24, 40)])
def test_encode_matches_diffusers_posterior(pair, hw):
    ref, ours = pair
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    x_before = x.clone()
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
    assert mean.shape == (2, 4, hw[0] // ours.scale_factor, hw[1] // ours.scale_factor)
    torch.testing.assert_close(mean, posterior.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(logvar, posterior.logvar, atol=1e-5, rtol=0)
    assert torch.equal(x, x_before)


def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
    z_before = z.clone()
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (2, 3, 16, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(z, z_before)  # unscaled latent in, caller's tensor untouched


def test_logvar_is_clamped_like_ldm(pair):
    vae = copy.deepcopy(pair[1])
    with torch.no_grad():
        # quant_conv's output is (mean, logvar) stacked on channels
        vae.quant_conv.weight[4:6] = 0.0
        vae.quant_conv.bias[4:6] = torch.tensor([-100.0, 100.0])
        _, logvar = vae.encode(torch.randn(1, 3, 16, 16))
    assert (logvar[:, 0] == -30.0).all() and (logvar[:, 1] == 20.0).all()
    assert logvar[:, 2:].abs().max() < 20.0


def test_config_from_a_saved_diffusers_config_json(tmp_path):
    AutoencoderKL(**tiny.VAE).save_config(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert "_class_name" in d and "force_upcast" in d
    config = configs.config_from_json(VAEConfig, d)
    # a tuple, as declared
    assert config.block_out_channels == (32, 64) and config.layers_per_block == 1
    assert config.scaling_factor == 0.18215


@pytest.mark.parametrize(
    "override",
    [
        dict(use_quant_conv=False),
        dict(latents_mean=[0.0] * 4),
        dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        dict(mid_block_add_attention=False),
        dict(some_future_option=1),
    ],
)
def test_config_json_with_non_sd_options_is_refused(override):
    with pytest.raises(ValueError, match="unsupported"):
        configs.config_from_json(VAEConfig, {**tiny.VAE, **override})


def test_full_size_sd_vae_on_meta():
    config = VAEConfig.sd()
    with torch.device("meta"):
        ours = VAE(config)
        ref = AutoencoderKL(**SD_DIFFUSERS)
    assert shapes(ours) == shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == SD_VAE_PARAMS
    for f in fields(config):
        assert as_list(getattr(config, f.name)) == as_list(ref.config[f.name]), f.name
    assert ours.scale_factor == 8


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value
