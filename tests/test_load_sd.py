"""convert.py, configs.py and load_sd.py: the LDM <-> diffusers key mapping against diffusers' own
converters; tiny official-layout single files and diffusers folders load into modules whose
outputs equal diffusers'; full-size key coverage on the meta device from the official SD v1 key
list; one-line errors on bad input."""

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
from transformers import CLIPTextModel, CLIPTokenizer

import configs
import convert
import load_sd
import text
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
    """`preset` with the fields a tiny config.json dict sets, but sample_size (which shapes
    cannot tell)."""
    names = {f.name for f in dataclasses.fields(preset)} - {"sample_size"}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}
    return dataclasses.replace(preset, **fields)


def assert_same_outputs(sd, pipe, context_dim=64):
    """Our UNet, VAE and text encoder give diffusers' outputs (fp32, 1e-5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(1, 4, 4, 4, generator=g)
    image = torch.randn(1, 3, 16, 16, generator=g)
    context = torch.randn(2, 77, context_dim, generator=g)
    t = torch.tensor([10, 980])
    close = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sd.unet(x, t, context), pipe.unet(x, t, context).sample, **close)

        decoded = sd.decode_latents(z * pipe.vae.config.scaling_factor)
        torch.testing.assert_close(decoded, pipe.vae.decode(z).sample, **close)
        mean = pipe.vae.encode(image).latent_dist.mean
        torch.testing.assert_close(sd.vae.encode(image)[0], mean, **close)

        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        expected = pipe.text_encoder(ids.input_ids).last_hidden_state
        torch.testing.assert_close(sd.encode_prompts(PROMPTS), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "unet_config", [tiny.UNET_V1, tiny.UNET_V2, tiny.UNET_XL], ids=["v1", "v2", "xl"]
)
def test_ours_to_ldm_inverts_diffusers_converters(unet_config):
    """ours_to_ldm on random diffusers weights, then diffusers' LDM -> diffusers converters, gives
    back exactly the original keys and tensors (v2: linear projections, 1 resnet per level; xl:
    label_emb, several transformer_blocks per attention, no attention at the first level)."""
    unet = tiny.randomize(UNet2DConditionModel(**unet_config))
    vae = tiny.randomize(AutoencoderKL(**tiny.VAE), seed=1)
    ucfg = configs.config_from_json(UNetConfig, unet_config)
    vcfg = configs.config_from_json(VAEConfig, tiny.VAE)
    for part, module, oracle, config in (
        ("unet", unet, convert_ldm_unet_checkpoint, unet_config),
        ("vae", vae, convert_ldm_vae_checkpoint, tiny.VAE),
    ):
        ours = {f"{part}.{k}": t for k, t in module.state_dict().items()}
        # LDM's VAE attention is 1x1 convs
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
        for k in ours:
            assert convert.ldm_to_ours(convert.ours_to_ldm(k, ucfg, vcfg), ucfg, vcfg) == k


def test_single_file_loads_like_diffusers(model, tmp_path):
    pipe, folder, single = model
    sd = load_sd.load(single, tokenizer=folder / "tokenizer")
    assert (sd.family, sd.prediction_type, sd.source) == ("sd1", "epsilon", str(single))
    # inferred from shapes
    assert sd.unet.config == preset_with(UNetConfig.sd1(), tiny.UNET_V1)
    assert sd.vae.config == preset_with(VAEConfig.sd(), tiny.VAE)
    assert_same_outputs(sd, pipe)

    # Round trip: what we write equals what we read, tensor for tensor (position ids included).
    load_sd.save_single_file(sd, tmp_path / "again.safetensors", metadata={"note": "round trip"})
    written = load_file(tmp_path / "again.safetensors")
    original = load_file(single)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_single_file_variants(model, tmp_path):
    """transformers 5 text names, a .ckpt with a "state_dict", and the named non-model tensors all
    load the same; a tensor of no known part is refused, listing it."""
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

    extra = {**tensors, "model.diffusion_model.extra.weight": torch.zeros(1)}
    save_file(extra, tmp_path / "extra.safetensors")
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
    assert sd.unet.config.use_linear_projection
    assert list(sd.unet.config.attention_head_dim) == [2, 4, 4]
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
    # openai/clip-vit-large-patch14's text config
    clip_l = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    assert {k: getattr(text_cfg, k) for k in clip_l} == clip_l

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
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert ignored == sorted(fixture["model"]["schedule_buffers"] + [position_ids])
    mapped = {convert.ldm_to_ours(k): tuple(s) for k, s in shapes.items() if k not in ignored}
    assert len(mapped) == len(shapes) - len(ignored) == 1143 - 13
    assert mapped.keys() == expected.keys()
    for k, s in mapped.items():
        # LDM's VAE attention is 1x1 convs, ours linear
        linear = convert.VAE_ATTN_WEIGHT.fullmatch(k)
        assert (s[:2] if linear else s) == expected[k], k
    assert all(convert.ours_to_ldm(convert.ldm_to_ours(k)) == k for k in shapes if k not in ignored)


def test_sdxl_unet_in_ldm_names_loads_like_diffusers():
    """A tiny SDXL UNet written in the official names: its config from the shapes alone (depth per
    level, heads from 64-dim heads, the added embedding from label_emb) is the tiny one, and it
    loads strict into ours with diffusers' outputs (fp32, 1e-5)."""
    ref = tiny.randomize(UNet2DConditionModel(**tiny.UNET_XL)).eval()
    config = configs.config_from_json(UNetConfig, tiny.UNET_XL)
    ldm = {convert.ours_to_ldm(f"unet.{k}", config): t for k, t in ref.state_dict().items()}
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    names = [k.removeprefix("model.diffusion_model.") for k in ldm]
    # upsampler after attention
    assert "label_emb.0.2.weight" in names and "output_blocks.5.2.conv.weight" in names
    first_level = (
        "input_blocks.1.1.",
        "input_blocks.2.1.",
        "output_blocks.6.1.",
        "output_blocks.7.1.",
        "output_blocks.8.1.",
    )
    # no attention at the first level
    assert not any(k.startswith(first_level) for k in names)

    # the config from the shapes (bigG's projection [width, pooled] tells the pooled text's width),
    # and the tensors under our names
    projection = torch.empty(tiny.BIG_G["hidden_size"], tiny.XL_POOLED)
    inferred = configs.unet_config({**ldm, convert.XL_OPENCLIP + "text_projection": projection})
    assert inferred == preset_with(UNetConfig.sdxl(), tiny.UNET_XL)
    ours = UNet(inferred).eval()
    renamed = {convert.ldm_to_ours(k, inferred).removeprefix("unet."): t for k, t in ldm.items()}
    ours.load_state_dict(renamed, strict=True)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, tiny.UNET_XL["cross_attention_dim"], generator=g)
    pooled = torch.randn(2, tiny.XL_POOLED, generator=g)
    numbers = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    t = torch.tensor([10, 980])
    with torch.no_grad():
        added_kwargs = dict(text_embeds=pooled, time_ids=numbers)
        expected = ref(x, t, context, added_cond_kwargs=added_kwargs)
        got = ours(x, t, context, torch.cat([pooled, numbers], dim=-1))
    torch.testing.assert_close(got, expected.sample, atol=1e-5, rtol=1e-5)


def test_sdxl_full_size_unet_key_coverage():
    """Every model.diffusion_model.* tensor of the official SDXL base 1.0 file maps onto our
    full-size UNet (meta device) with its shape, and ours map back onto exactly those keys; the
    config from the shapes is SDXL base's (the pooled text's width from bigG's projection)."""
    with open(XL_FIXTURE) as f:
        tensors = json.load(f)["tensors"]
    shapes = {k: tuple(s) for k, s in tensors.items() if k.startswith("model.diffusion_model.")}
    projection = convert.XL_OPENCLIP + "text_projection"
    assert len(shapes) == 1680
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    meta[projection] = torch.empty(tensors[projection], device="meta")
    config = configs.unet_config(meta)
    assert config == UNetConfig.sdxl()
    with torch.device("meta"):
        unet = UNet(config)
    expected = {f"unet.{k}": tuple(t.shape) for k, t in unet.state_dict().items()}
    mapped = {convert.ldm_to_ours(k, config): s for k, s in shapes.items()}
    assert mapped == expected
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert {convert.ours_to_ldm(k, config) for k in expected} == shapes.keys()


class Payload:
    """Pickled code: unpickling it would call os.getcwd (harmless; weights_only refuses it)."""

    def __reduce__(self):
        return os.getcwd, ()


def bad_inputs(single, tmp_path):
    """(source, tokenizer, expected message) of each kind of bad input; files in tmp_path."""
    tensors = load_file(single)
    (tmp_path / "truncated.safetensors").write_bytes(single.read_bytes()[:1000])
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    v2_names = {**tensors, "cond_stage_model.model.ln_final.weight": torch.zeros(2)}
    save_file(v2_names, tmp_path / "v2.safetensors")
    # the SDXL refiner's one text encoder: OpenCLIP as embedder 0
    refiner = {
        "conditioner.embedders.0.model.ln_final.weight": torch.zeros(2),
        "model.diffusion_model.x": torch.zeros(1),
    }
    save_file(refiner, tmp_path / "refiner.safetensors")
    partial = {k: t for k, t in tensors.items() if "middle_block" not in k}
    save_file(partial, tmp_path / "partial.safetensors")
    hole = "model.diffusion_model.output_blocks.0.0.skip_connection.bias"
    save_file({k: t for k, t in tensors.items() if k != hole}, tmp_path / "hole.safetensors")
    torch.save({"state_dict": tensors, "payload": Payload()}, tmp_path / "code.ckpt")
    return [
        ("missing.safetensors", None, "no such file or folder"),
        ("truncated.safetensors", None, "cannot read .*truncated.safetensors: SafetensorError"),
        ("other.safetensors", None, "not an SD v1, 2.x or XL base checkpoint .* found weight"),
        # v1 tensors, one of OpenCLIP's
        ("v2.safetensors", None, "incomplete SD 2.x checkpoint: KeyError"),
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
            "cannot load the CLIP tokenizer nobody/no-such-tokenizer .*: "
            "2 tokens for 514 embeddings",
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
    """What --export-full writes has an official file's key set (SD v1 at full size, on the meta
    device), LDM's 12 schedule buffers with diffusers' values, and the image size in the
    model-spec metadata."""
    _, folder, single = model
    with open(FIXTURE) as f:
        fixture = json.load(f)
    meta = {k: torch.empty(s, device="meta") for k, s in fixture["tensors"].items()}
    unet, vae, text = configs.infer_configs(meta)
    with torch.device("meta"):
        full = load_sd.StableDiffusion(
            UNet(unet), VAE(vae), CLIPTextModel(text), None, "sd1", "epsilon", "sd-v1"
        )
    tensors = load_sd.ldm_state_dict(full)
    assert {k: list(t.shape) for k, t in tensors.items()} == fixture["tensors"]

    # the schedule buffers
    written = load_file(single)
    ddpm_config = {
        k: v for k, v in tiny.SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")
    }
    ddpm = DDPMScheduler(**ddpm_config)
    torch.testing.assert_close(written["betas"], ddpm.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(written["alphas_cumprod"], ddpm.alphas_cumprod, rtol=1e-5, atol=0)
    # diffusers works in float32, LDM (and we) in float64: 1 - alpha_bar near t = 0 costs
    # diffusers ~1e-4. DDPM eq. 7's beta-tilde and mean coefficients:
    variance = torch.stack([ddpm._get_variance(t) for t in range(1, 1000)])
    a = ddpm.alphas_cumprod[1:]
    a_prev = ddpm.alphas_cumprod[:-1]
    b = ddpm.betas[1:]
    coef1 = a_prev.sqrt() * b / (1 - a)
    coef2 = (1 - b).sqrt() * (1 - a_prev) / (1 - a)
    torch.testing.assert_close(written["posterior_variance"][1:], variance, rtol=3e-4, atol=0)
    torch.testing.assert_close(written["posterior_mean_coef1"][1:], coef1, rtol=3e-4, atol=0)
    torch.testing.assert_close(written["posterior_mean_coef2"][1:], coef2, rtol=3e-4, atol=0)

    # the image size: the writer's default, SD v1's; a folder says its own
    sd = load_sd.load(single, tokenizer=folder / "tokenizer")
    assert sd.image_size == 512
    load_sd.save_single_file(dataclasses.replace(sd, image_size=48), tmp_path / "s.safetensors")
    sized = load_sd.load(tmp_path / "s.safetensors", tokenizer=folder / "tokenizer")
    assert sized.image_size == 48
    # unet sample_size 8 x the tiny VAE's 2
    assert load_sd.load(folder).image_size == 16


def test_folder_with_transformers_bin_names_and_a_variant(model, tmp_path):
    """text_encoder/pytorch_model.bin (older repos) loads; --variant fp16 reads *.fp16.* files."""
    pipe, folder, _ = model
    shutil.copytree(folder, tmp_path / "bin")
    text = tmp_path / "bin" / "text_encoder"
    torch.save(load_file(text / "model.safetensors"), text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    assert_same_outputs(load_sd.load(tmp_path / "bin"), pipe)

    # diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.fp16.safetensors, ...
    shutil.copytree(folder, tmp_path / "fp16")
    for part in load_sd.PARTS["sd1"]:
        name = load_sd.WEIGHTS[part][0]
        stem, ext = os.path.splitext(name)
        os.rename(tmp_path / "fp16" / part / name, tmp_path / "fp16" / part / f"{stem}.fp16{ext}")
    assert_same_outputs(load_sd.load(tmp_path / "fp16", variant="fp16"), pipe)
    with pytest.raises(
        load_sd.LoadError, match="expected diffusion_pytorch_model.safetensors or .*bin"
    ):
        load_sd.load(tmp_path / "fp16")
    with pytest.raises(load_sd.LoadError, match="--variant is for diffusers folders"):
        load_sd.load(model[2], variant="fp16")


def test_hub_download_asks_for_the_revision_and_only_the_files_needed(model, tmp_path, monkeypatch):
    """The hub path, with huggingface_hub's snapshot_download stood in by the tiny folder: it is
    asked for the revision, configs, tokenizer and per part the variant's .safetensors, then .bin
    where those are missing."""
    calls = []
    folder = tmp_path / "snapshot"
    shutil.copytree(model[1], folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(vae), folder / "vae" / "diffusion_pytorch_model.bin")
    vae.unlink()

    def snapshot_download(repo, revision=None, allow_patterns=()):
        calls.append((repo, revision, sorted(allow_patterns)))
        return str(folder)

    # huggingface_hub's function (the library's attribute, not ours) stood in
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    load_sd.load("someone/tiny-sd", revision="abc123")
    assert [c[:2] for c in calls] == [("someone/tiny-sd", "abc123")] * 2
    first = {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/*",
        "unet/config.json",
    }
    assert first <= set(calls[0][2]) and not any(p.endswith(".bin") for p in calls[0][2])
    # the one part without .safetensors
    assert calls[1][2] == ["vae/diffusion_pytorch_model.bin"]

    # the tiny repo has no fp16 files
    calls.clear()
    with pytest.raises(load_sd.LoadError, match="no weights"):
        load_sd.load("someone/tiny-sd", variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0][2]


def test_the_long_prompt_warning_remembers_a_bounded_number_of_prompts(capsys):
    """A server meets ever new prompts: the set of those warned about as too long stays within
    text.MAX_WARNED, and a prompt it remembers is not warned about again."""
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(load_sd.TOY_DIR, "tokenizer"))
    long = " ".join(["circle"] * 80)
    warned = set()
    for i in range(text.MAX_WARNED + 50):
        text.tokenize(tokenizer, [f"{i} {long}"], warned)
    assert 0 < len(warned) <= text.MAX_WARNED
    assert capsys.readouterr().err.count("first dropped word") == text.MAX_WARNED + 50

    # The latest is remembered.
    text.tokenize(tokenizer, [f"{text.MAX_WARNED + 49} {long}"], warned)
    assert "first dropped word" not in capsys.readouterr().err
