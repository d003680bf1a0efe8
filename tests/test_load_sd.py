"""convert.py, configs.py and load_sd.py: the LDM <-> diffusers key mapping against diffusers' own converters;
tiny official-layout single files and diffusers folders load into modules whose outputs equal diffusers';
full-size key coverage on the meta device from the official SD v1 key list; one-line errors on bad input."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import configs
import convert
import load_sd
import tiny
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd_v1_ldm.json")
XL_FIXTURE = os.path.join(os.path.dirname(FIXTURE), "sdxl_ldm.json")
PROMPTS = ["a red circle", ""]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return tiny_sd.pipe, tiny_sd.folder, tiny_sd.single


def preset_with(preset, config):
    """`preset` with the fields a tiny config.json dict sets, but sample_size (shapes cannot tell it)."""
    names = {f.name for f in dataclasses.fields(preset)} - {"sample_size"}
    return dataclasses.replace(
        preset,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names},
    )


def assert_same_outputs(sd, pipe, context_dim=64):
    """Our UNet, VAE and text encoder give diffusers' outputs (fp32, 1e-5)."""
    g = torch.Generator().manual_seed(0)
    x, z, image = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(1, 4, 4, 4, generator=g),
        torch.randn(1, 3, 16, 16, generator=g),
    )
    context = torch.randn(2, 77, context_dim, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            sd.unet(x, torch.tensor([10, 980]), context),
            pipe.unet(x, torch.tensor([10, 980]), context).sample,
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            sd.decode_latents(z * pipe.vae.config.scaling_factor),
            pipe.vae.decode(z).sample,
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            sd.vae.encode(image)[0], pipe.vae.encode(image).latent_dist.mean, atol=1e-5, rtol=1e-5
        )
        ids = pipe.tokenizer(
            PROMPTS, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        torch.testing.assert_close(
            sd.encode_prompts(PROMPTS), pipe.text_encoder(ids).last_hidden_state, atol=0, rtol=0
        )


@pytest.mark.parametrize(
    "unet_config", [tiny.UNET_V1, tiny.UNET_V2, tiny.UNET_XL], ids=["v1", "v2", "xl"]
)
def test_ours_to_ldm_inverts_diffusers_converters(unet_config):
    """ours_to_ldm on random diffusers weights, then diffusers' LDM -> diffusers converters, gives back
    exactly the original keys and tensors (v2: linear projections, 1 resnet per level; xl: label_emb, several
    transformer_blocks per attention, no attention at the first level)."""
    unet = tiny.randomize(UNet2DConditionModel(**unet_config))
    vae = tiny.randomize(AutoencoderKL(**tiny.VAE), seed=1)
    ucfg, vcfg = (
        configs.config_from_json(UNetConfig, unet_config),
        configs.config_from_json(VAEConfig, tiny.VAE),
    )
    for part, module, oracle, config in (
        ("unet", unet, convert_ldm_unet_checkpoint, unet_config),
        ("vae", vae, convert_ldm_vae_checkpoint, tiny.VAE),
    ):
        ours = {f"{part}.{k}": t for k, t in module.state_dict().items()}
        ldm = {
            convert.ours_to_ldm(k, ucfg, vcfg): t[:, :, None, None]
            if convert.VAE_ATTN_WEIGHT.fullmatch(k)
            else t
            for k, t in ours.items()
        }
        assert len(ldm) == len(ours)
        back = oracle(ldm, config)
        assert back.keys() == module.state_dict().keys()
        for k, t in module.state_dict().items():
            assert torch.equal(back[k], t), k
        assert all(
            convert.ldm_to_ours(convert.ours_to_ldm(k, ucfg, vcfg), ucfg, vcfg) == k for k in ours
        )


def test_single_file_loads_like_diffusers(model, tmp_path):
    pipe, folder, single = model
    sd = load_sd.load(single, tokenizer=folder / "tokenizer")
    assert (sd.family, sd.prediction_type, sd.source) == ("sd1", "epsilon", str(single))
    assert sd.unet.config == preset_with(UNetConfig.sd1(), tiny.UNET_V1)  # inferred from shapes
    assert sd.vae.config == preset_with(VAEConfig.sd(), tiny.VAE)
    assert_same_outputs(sd, pipe)
    # Round trip: what we write equals what we read, tensor for tensor (position ids included).
    load_sd.save_single_file(sd, tmp_path / "again.safetensors", metadata={"note": "round trip"})
    written, original = load_file(tmp_path / "again.safetensors"), load_file(single)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_single_file_variants(model, tmp_path):
    """transformers 5 text names, a .ckpt with a "state_dict", and the named non-model tensors all load
    the same; a tensor of no known part is refused, listing it."""
    pipe, folder, single = model
    tensors = load_file(single)
    new_names = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): t
        for k, t in tensors.items()
    }
    extras = {
        "betas": torch.zeros(1000),
        "alphas_cumprod": torch.zeros(1000),
        "logvar": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelconv_inweight": torch.zeros(1),
    }
    save_file({**new_names, **extras}, tmp_path / "t5.safetensors")
    torch.save({"state_dict": {**tensors, **extras}, "global_step": 1}, tmp_path / "sd.ckpt")
    for path in (tmp_path / "t5.safetensors", tmp_path / "sd.ckpt"):
        assert_same_outputs(load_sd.load(path, tokenizer=folder / "tokenizer"), pipe)
    save_file(
        {**tensors, "model.diffusion_model.extra.weight": torch.zeros(1)},
        tmp_path / "extra.safetensors",
    )
    with pytest.raises(load_sd.LoadError, match="unexpected tensors, e.g. extra.weight"):
        load_sd.load(tmp_path / "extra.safetensors", tokenizer=folder / "tokenizer")
    save_file({**tensors, "lora.weight": torch.zeros(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(load_sd.LoadError, match="1 tensors of no SD v1 part, e.g. lora.weight"):
        load_sd.load(tmp_path / "lora.safetensors", tokenizer=folder / "tokenizer")


def test_diffusers_folder(model, tmp_path):
    pipe, folder, _ = model
    sd = load_sd.load(folder)
    assert (sd.family, sd.prediction_type) == ("sd1", "epsilon")
    assert sd.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert sd.latent_shape(16, 24) == (4, 8, 12)
    assert_same_outputs(sd, pipe)


def test_diffusers_folder_v2_with_bin_weights(tmp_path):
    """A v2-style folder (linear projections, per-level heads) is family sd2; the scheduler's
    prediction type is read; PyTorch .bin weights load through weights_only."""
    pipe = tiny.pipeline(unet_config=tiny.UNET_V2, folder=tmp_path)
    with open(tmp_path / "scheduler" / "scheduler_config.json") as f:
        scheduler = dict(json.load(f), prediction_type="v_prediction")
    with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(scheduler, f)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), tmp_path / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    sd = load_sd.load(tmp_path)
    assert (sd.family, sd.prediction_type) == ("sd2", "v_prediction")
    assert sd.unet.config.use_linear_projection and list(sd.unet.config.attention_head_dim) == [
        2,
        4,
        4,
    ]
    assert_same_outputs(sd, pipe, context_dim=tiny.UNET_V2["cross_attention_dim"])


def test_full_size_key_coverage():
    """Every key of an official SD v1 file maps onto our full-size modules (built on meta) with its
    shape, or is a documented non-model tensor; the configs inferred from the shapes are SD v1's."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    shapes = fixture["tensors"]
    ldm = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet_cfg, vae_cfg, text_cfg = configs.infer_configs(ldm)
    assert unet_cfg == UNetConfig.sd1() and vae_cfg == VAEConfig.sd()
    assert (
        text_cfg.vocab_size,
        text_cfg.hidden_size,
        text_cfg.intermediate_size,
        text_cfg.num_hidden_layers,
        text_cfg.num_attention_heads,
        text_cfg.max_position_embeddings,
        text_cfg.hidden_act,
    ) == (49408, 768, 3072, 12, 12, 77, "quick_gelu")  # openai/clip-vit-large-patch14's text config
    with torch.device("meta"):
        modules = {
            "unet": UNet(unet_cfg),
            "vae": VAE(vae_cfg),
            "text_encoder": CLIPTextModel(text_cfg),
        }
    expected = {
        f"{p}.{k}": tuple(t.shape) for p, m in modules.items() for k, t in m.state_dict().items()
    }
    ignored = sorted(k for k in shapes if convert.IGNORED.fullmatch(k))
    assert ignored == sorted(
        fixture["model"]["schedule_buffers"]
        + ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    )
    mapped = {convert.ldm_to_ours(k): tuple(s) for k, s in shapes.items() if k not in ignored}
    assert len(mapped) == len(shapes) - len(ignored) == 1143 - 13
    assert mapped.keys() == expected.keys()
    for k, s in mapped.items():
        linear = convert.VAE_ATTN_WEIGHT.fullmatch(
            k
        )  # LDM's VAE attention is 1x1 convs, ours linear
        assert (s[:2] if linear else s) == expected[k], k
    assert all(convert.ours_to_ldm(convert.ldm_to_ours(k)) == k for k in shapes if k not in ignored)


def test_sdxl_unet_in_ldm_names_loads_like_diffusers():
    """A tiny SDXL UNet written in the official names: its config from the shapes alone (depth per level, heads
    from 64-dim heads, the added embedding from label_emb) is the tiny one, and it loads strict into ours with
    diffusers' outputs (fp32, 1e-5)."""
    ref = tiny.randomize(UNet2DConditionModel(**tiny.UNET_XL)).eval()
    config = configs.config_from_json(UNetConfig, tiny.UNET_XL)
    ldm = {convert.ours_to_ldm(f"unet.{k}", config): t for k, t in ref.state_dict().items()}
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    names = [k.removeprefix("model.diffusion_model.") for k in ldm]
    assert (
        "label_emb.0.2.weight" in names and "output_blocks.5.2.conv.weight" in names
    )  # upsampler after attention
    first_level = (
        "input_blocks.1.1.",
        "input_blocks.2.1.",
        "output_blocks.6.1.",
        "output_blocks.7.1.",
        "output_blocks.8.1.",
    )
    assert not any(k.startswith(first_level) for k in names)  # no attention at the first level
    inferred = configs.unet_config(ldm)
    assert inferred == preset_with(UNetConfig.sdxl(), tiny.UNET_XL)
    ours = UNet(inferred).eval()
    ours.load_state_dict(
        {convert.ldm_to_ours(k, inferred).removeprefix("unet."): t for k, t in ldm.items()},
        strict=True,
    )
    g = torch.Generator().manual_seed(0)
    x, context = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 77, tiny.UNET_XL["cross_attention_dim"], generator=g),
    )
    pooled, numbers = (
        torch.randn(2, tiny.XL_POOLED, generator=g),
        torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2),
    )
    with torch.no_grad():
        expected = ref(
            x,
            torch.tensor([10, 980]),
            context,
            added_cond_kwargs=dict(text_embeds=pooled, time_ids=numbers),
        )
        got = ours(x, torch.tensor([10, 980]), context, torch.cat([pooled, numbers], dim=-1))
    torch.testing.assert_close(got, expected.sample, atol=1e-5, rtol=1e-5)


def test_sdxl_full_size_unet_key_coverage():
    """Every model.diffusion_model.* tensor of the official SDXL base 1.0 file maps onto our full-size UNet (meta
    device) with its shape, and ours map back onto exactly those keys; the config from the shapes is SDXL base's."""
    with open(XL_FIXTURE) as f:
        shapes = {
            k: tuple(s)
            for k, s in json.load(f)["tensors"].items()
            if k.startswith("model.diffusion_model.")
        }
    assert len(shapes) == 1680
    config = configs.unet_config({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert config == UNetConfig.sdxl()
    with torch.device("meta"):
        unet = UNet(config)
    expected = {f"unet.{k}": tuple(t.shape) for k, t in unet.state_dict().items()}
    mapped = {convert.ldm_to_ours(k, config): s for k, s in shapes.items()}
    assert mapped == expected
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert {convert.ours_to_ldm(k, config) for k in expected} == shapes.keys()


class Payload:
    """Pickled code: unpickling it would call os.getcwd (harmless, but weights_only must refuse it)."""

    def __reduce__(self):
        return os.getcwd, ()


def bad_inputs(single, tmp_path):
    """(source, tokenizer, expected message) for each kind of bad input, its files written to tmp_path."""
    tensors = load_file(single)
    (tmp_path / "truncated.safetensors").write_bytes(single.read_bytes()[:1000])
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    save_file(
        {**tensors, "cond_stage_model.model.ln_final.weight": torch.zeros(2)},
        tmp_path / "v2.safetensors",
    )
    save_file(
        {
            "conditioner.embedders.0.model.ln_final.weight": torch.zeros(2),
            "model.diffusion_model.x": torch.zeros(1),
        },
        tmp_path / "refiner.safetensors",
    )  # the SDXL refiner's one text encoder: OpenCLIP as embedder 0
    save_file(
        {k: t for k, t in tensors.items() if "middle_block" not in k},
        tmp_path / "partial.safetensors",
    )
    hole = "model.diffusion_model.output_blocks.0.0.skip_connection.bias"
    save_file({k: t for k, t in tensors.items() if k != hole}, tmp_path / "hole.safetensors")
    torch.save({"state_dict": tensors, "payload": Payload()}, tmp_path / "code.ckpt")
    return [
        ("missing.safetensors", None, "no such file or folder"),
        ("truncated.safetensors", None, "cannot read .*truncated.safetensors: SafetensorError"),
        ("other.safetensors", None, "not an SD v1, 2.x or XL base checkpoint .* found weight"),
        (
            "v2.safetensors",
            None,
            "incomplete SD 2.x checkpoint: KeyError",
        ),  # v1 tensors, one of OpenCLIP's
        (
            "refiner.safetensors",
            None,
            "not an SD v1, 2.x or XL base checkpoint .* found conditioner.embedders.0, model",
        ),
        ("partial.safetensors", None, "incomplete SD v1 checkpoint: KeyError"),
        (
            "hole.safetensors",
            None,
            "UNet: 1 missing tensors, e.g. up_blocks.0.resnets.0.conv_shortcut.bias",
        ),
        ("code.ckpt", None, "cannot read .*code.ckpt: UnpicklingError"),
        (".", None, "not a diffusers SD folder"),
        (
            single,
            "nobody/no-such-tokenizer",
            "cannot load the CLIP tokenizer nobody/no-such-tokenizer .*: 2 tokens for 514 embeddings",
        ),
        (
            "nobody/no-such-model",
            None,
            "cannot download nobody/no-such-model from the Hugging Face hub .offline",
        ),
    ]


def test_bad_input_is_one_line_load_error(model, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _, folder, single = model
    for source, tokenizer, message in bad_inputs(single, tmp_path):
        source = source if source == single or "/" in source else tmp_path / source
        with pytest.raises(load_sd.LoadError, match=message) as e:
            load_sd.load(source, tokenizer=tokenizer or folder / "tokenizer")
        assert "\n" not in str(e.value), source


def test_writer_adds_the_schedule_buffers_and_the_image_size(model, tmp_path):
    """What --export-full writes has an official file's key set (SD v1 at full size, on the meta device),
    LDM's 12 schedule buffers with diffusers' values, and the image size as model-spec metadata."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    unet, vae, text = configs.infer_configs(
        {k: torch.empty(s, device="meta") for k, s in fixture["tensors"].items()}
    )
    with torch.device("meta"):
        full = load_sd.StableDiffusion(
            UNet(unet), VAE(vae), CLIPTextModel(text), None, "sd1", "epsilon", "sd-v1"
        )
    tensors = load_sd.ldm_state_dict(full)
    assert {k: list(t.shape) for k, t in tensors.items()} == fixture["tensors"]
    written = load_file(model[2])
    ddpm = DDPMScheduler(
        **{k: v for k, v in tiny.SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    torch.testing.assert_close(written["betas"], ddpm.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(written["alphas_cumprod"], ddpm.alphas_cumprod, rtol=1e-5, atol=0)
    # diffusers works in float32, LDM (and we) in float64: 1 - alpha_bar near t = 0 costs diffusers ~1e-4
    variance = torch.stack(
        [ddpm._get_variance(t) for t in range(1, 1000)]
    )  # DDPM eq. 7's beta-tilde
    torch.testing.assert_close(written["posterior_variance"][1:], variance, rtol=3e-4, atol=0)
    a, a_prev, b = ddpm.alphas_cumprod[1:], ddpm.alphas_cumprod[:-1], ddpm.betas[1:]
    torch.testing.assert_close(
        written["posterior_mean_coef1"][1:], a_prev.sqrt() * b / (1 - a), rtol=3e-4, atol=0
    )
    torch.testing.assert_close(
        written["posterior_mean_coef2"][1:],
        (1 - b).sqrt() * (1 - a_prev) / (1 - a),
        rtol=3e-4,
        atol=0,
    )
    sd = load_sd.load(model[2], tokenizer=model[1] / "tokenizer")
    assert sd.image_size == 512  # the writer's default, SD v1's; a folder says its own
    load_sd.save_single_file(dataclasses.replace(sd, image_size=48), tmp_path / "s.safetensors")
    assert (
        load_sd.load(tmp_path / "s.safetensors", tokenizer=model[1] / "tokenizer").image_size == 48
    )
    assert load_sd.load(model[1]).image_size == 16  # unet sample_size 8 x the tiny VAE's 2


def test_folder_with_transformers_bin_names_and_a_variant(model, tmp_path):
    """text_encoder/pytorch_model.bin (older repos) loads; --variant fp16 reads *.fp16.* weight files."""
    pipe, folder, _ = model
    shutil.copytree(folder, tmp_path / "bin")
    text = tmp_path / "bin" / "text_encoder"
    torch.save(load_file(text / "model.safetensors"), text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    assert_same_outputs(load_sd.load(tmp_path / "bin"), pipe)
    shutil.copytree(folder, tmp_path / "fp16")
    for part in load_sd.PARTS["sd1"]:
        name = load_sd.WEIGHTS[part][0]
        os.rename(
            tmp_path / "fp16" / part / name,
            tmp_path / "fp16" / part / load_sd._variant(name, "fp16"),
        )
    assert_same_outputs(load_sd.load(tmp_path / "fp16", variant="fp16"), pipe)
    with pytest.raises(
        load_sd.LoadError, match="expected diffusion_pytorch_model.safetensors or .*bin"
    ):
        load_sd.load(tmp_path / "fp16")
    with pytest.raises(load_sd.LoadError, match="--variant is for diffusers folders"):
        load_sd.load(model[2], variant="fp16")


def test_hub_download_asks_for_the_revision_and_only_the_files_needed(model, tmp_path, monkeypatch):
    """The hub path, with huggingface_hub's snapshot_download stood in by the tiny folder: it is asked for
    the revision, configs, tokenizer and per part the variant's .safetensors, then .bin where those are missing."""
    calls, folder = [], tmp_path / "snapshot"
    shutil.copytree(model[1], folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(vae), folder / "vae" / "diffusion_pytorch_model.bin")
    vae.unlink()

    def snapshot_download(repo, revision=None, allow_patterns=()):
        calls.append((repo, revision, sorted(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(load_sd, "snapshot_download", snapshot_download)
    load_sd.load("someone/tiny-sd", revision="abc123")
    assert [c[:2] for c in calls] == [("someone/tiny-sd", "abc123")] * 2
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/*",
        "unet/config.json",
    } <= set(calls[0][2]) and not any(p.endswith(".bin") for p in calls[0][2])
    assert calls[1][2] == ["vae/diffusion_pytorch_model.bin"]  # the one part without .safetensors
    calls.clear()
    with pytest.raises(load_sd.LoadError, match="no weights"):
        load_sd.load("someone/tiny-sd", variant="fp16")  # the tiny repo has no fp16 files
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0][2]
