"""unet.py against diffusers' UNet2DConditionModel (the oracle), fp32 on CPU: same random weights
loaded by identity give the same eps; key sets equal at tiny and at full SD v1/v2/XL size (meta
device)."""

import functools
import json
import math
import os
from dataclasses import fields

import pytest
import torch
from diffusers import UNet2DConditionModel

import configs
import tiny
from unet import Attention, UNet, UNetConfig

# tests/fixtures/README.md: model.diffusion_model.* scalars
PARAMS = {"sd1": 859_520_964, "sdxl": 2_567_463_684}
# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers' defaults give the SD v1 block types).
SD1_DIFFUSERS = dict(
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    sample_size=64,
)
# stabilityai/stable-diffusion-2-1 unet/config.json
SD2_DIFFUSERS = dict(
    SD1_DIFFUSERS,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, as the fixture records it (the hub's
# file also writes "upcast_attention": null, which the fixture leaves out)
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sdxl_ldm.json")
with open(FIXTURE) as f:
    SDXL_DIFFUSERS = dict(json.load(f)["model"]["diffusers_configs"]["unet"], upcast_attention=None)


@functools.cache
def pair(name):
    """diffusers' model with random weights, and ours loaded from its state dict (strict)."""
    ref = tiny.randomize(UNet2DConditionModel(**getattr(tiny, name))).eval()
    ours = UNet(configs.config_from_json(UNetConfig, getattr(tiny, name))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["UNET_V1", "UNET_V2", "UNET_XL"])
def test_state_dict_keys_and_shapes_equal_diffusers(name):
    config = getattr(tiny, name)
    ours = UNet(configs.config_from_json(UNetConfig, config))
    assert shapes(ours) == shapes(UNet2DConditionModel(**config))


# t as a python int and as a [B] tensor; 10x6 has odd sides at lower levels (upsampling to the
# skip's size).
@pytest.mark.parametrize(
    "name, t, hw",
    [
        ("UNET_V1", 981, (8, 8)),
        ("UNET_V1", "per-sample", (10, 6)),
        ("UNET_V2", "per-sample", (8, 8)),
        ("UNET_V2", 1, (10, 6)),
    ],
)
def test_forward_matches_diffusers(name, t, hw):
    config = getattr(tiny, name)
    ref, ours = pair(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=g)
    t = torch.tensor([1, 961]) if t == "per-sample" else t
    x_before = x.clone()
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(x, x_before)  # no in-place change to the caller's tensor


def xl_inputs(hw, seed=1):
    """x, context and SDXL's added conditioning for tiny.UNET_XL: pooled text embeddings and the
    six numbers (original h, w, crop top, left, target h, w), different per sample; also as
    diffusers' added_cond_kwargs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=g)
    context = torch.randn(2, 77, tiny.UNET_XL["cross_attention_dim"], generator=g)
    pooled = torch.randn(2, tiny.XL_POOLED, generator=g)
    numbers = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]])
    added = torch.cat([pooled, numbers], dim=-1)
    return x, context, added, dict(text_embeds=pooled, time_ids=numbers)


@pytest.mark.parametrize(
    "name, t, hw",
    [
        ("UNET_XL", "per-sample", (8, 8)),
        ("UNET_XL", 981, (10, 6)),
        ("UNET_XL_NARROW", "per-sample", (8, 8)),
    ],
)
def test_sdxl_forward_matches_diffusers(name, t, hw):
    """No attention at the first level, transformer depth 2 and 3 (and 3 in the middle block), the
    added embedding of pooled text and size numbers (SDXL base's 256 wide each, or 8):
    diffusers' SDXL UNet at 1e-5."""
    ref, ours = pair(name)
    x, context, added, added_cond_kwargs = xl_inputs(hw)
    t = torch.tensor([1, 961]) if t == "per-sample" else t
    inputs = [v.clone() for v in (x, context, added)]
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs)
        got = ours(x, t, context, added)
    torch.testing.assert_close(got, expected.sample, atol=1e-5, rtol=0)
    # no in-place change
    assert all(torch.equal(a, b) for a, b in zip((x, context, added), inputs))


def test_sdxl_added_conditioning_matters_and_is_checked():
    """Each sample's numbers and pooled embedding change that sample's eps only; a UNet with an
    added embedding refuses a call without `added`, one without refuses `added`."""
    _, ours = pair("UNET_XL")
    x, context, added, _ = xl_inputs((8, 8))
    # pooled; original width; target width
    columns = (0, tiny.XL_POOLED + 1, tiny.XL_POOLED + 5)
    with torch.no_grad():
        base = ours(x, 500, context, added)
        for column in columns:
            changed = added.clone()
            changed[1, column] += 1
            diff = (ours(x, 500, context, changed) - base).abs().amax(dim=(1, 2, 3))
            assert diff[0] == 0 and diff[1] > 1e-4, column

    with pytest.raises(ValueError, match="needs `added`"):
        ours(x, 500, context)
    with pytest.raises(ValueError, match="takes no `added`"):
        pair("UNET_V2")[1](x, 500, torch.randn(2, 77, 128), added)


def test_timestep_forms_agree_and_matter():
    _, ours = pair("UNET_V1")
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, 64)
    with torch.no_grad():
        as_int = ours(x, 700, context)
        as_scalar = ours(x, torch.tensor(700), context)
        as_batch = ours(x, torch.tensor([700, 700]), context)
        torch.testing.assert_close(as_scalar, as_int, atol=0, rtol=0)
        torch.testing.assert_close(as_batch, as_int, atol=0, rtol=0)
        assert not torch.allclose(ours(x, 10, context), as_int, atol=1e-3)


@pytest.mark.parametrize("context_len", [None, 7])  # self-attention, cross-attention
def test_attention_matches_softmax_formula(context_len):
    torch.manual_seed(0)
    heads = 4
    d = 8
    dim = 32
    ctx_dim = 24
    attn = Attention(dim, heads, d, ctx_dim if context_len else None)
    x = torch.randn(2, 5, dim)
    context = torch.randn(2, context_len, ctx_dim) if context_len else x

    def split(t):
        return t.view(2, -1, heads, d).transpose(1, 2)  # (B, heads, N, d)

    q = split(attn.to_q(x))
    k = split(attn.to_k(context))
    v = split(attn.to_v(context))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    expected = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 5, heads * d))
    got = attn(x, context if context_len else None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_same_gradients_and_recomputes():
    # fresh: this test sets grads and the flag
    ours = UNet(configs.config_from_json(UNetConfig, tiny.UNET_V2))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, 128, generator=g)
    calls = []
    ours.down_blocks[0].resnets[0].register_forward_hook(lambda *_: calls.append(1))

    def grads(checkpointing):
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing = checkpointing
        calls.clear()
        ours(x, torch.tensor([3, 900]), context).square().mean().backward()
        return {k: p.grad.clone() for k, p in ours.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    # the block ran again during backward
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_config_from_a_saved_diffusers_config_json(tmp_path):
    UNet2DConditionModel(**tiny.UNET_V2).save_config(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    # bookkeeping and ignored keys are present
    assert "_class_name" in d and "upcast_attention" in d
    config = configs.config_from_json(UNetConfig, d)
    # tuples, as declared
    assert config.attention_head_dim == (2, 4, 4) and config.use_linear_projection
    assert config.cross_attention_dim == 128 and config.layers_per_block == 1


@pytest.mark.parametrize(
    "override",
    [
        dict(class_embed_type="timestep"),
        dict(addition_embed_type="text"),
        dict(num_class_embeds=10),
        dict(only_cross_attention=[False, True, False]),
        dict(some_future_option=1),
        dict(down_block_types=["SimpleCrossAttnDownBlock2D"] * 3),
    ],
)
def test_config_json_with_non_sd_options_is_refused(override):
    with pytest.raises(ValueError, match="unsupported"):
        configs.config_from_json(UNetConfig, {**tiny.UNET_V1, **override})


@pytest.mark.parametrize(
    "preset, diffusers_config",
    [("sd1", SD1_DIFFUSERS), ("sd2", SD2_DIFFUSERS), ("sdxl", SDXL_DIFFUSERS)],
)
def test_full_size_presets_match_diffusers_on_meta(preset, diffusers_config):
    config = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        ours = UNet(config)
        ref = UNet2DConditionModel(**diffusers_config)
    # every key diffusers writes, read
    assert configs.config_from_json(UNetConfig, dict(ref.config)) == config
    assert shapes(ours) == shapes(ref)
    for f in fields(config):
        assert as_list(getattr(config, f.name)) == as_list(ref.config[f.name]), f.name
    # head counts do not show in shapes
    assert heads(ours) == heads(ref)


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def heads(module):
    """{attention name: head count} of a UNet's attn1 and attn2 modules."""
    return {k: a.heads for k, a in module.named_modules() if k[-5:] in ("attn1", "attn2")}


@pytest.mark.parametrize("preset", PARAMS)
def test_parameter_count(preset):
    with torch.device("meta"):
        ours = UNet(getattr(UNetConfig, preset)())
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[preset]
