"""SD 2.x single files.

- A tiny file in the official layout (LDM UNet and VAE names, OpenCLIP's text tower with its fused
  q, k, v, its last block and contrastive head) built here loads with every tensor consumed and
  gives diffusers' outputs, diffusers converting the same file (and a hand-written OpenCLIP text
  forward).
- The full-size key list maps on the meta device.
- What our writer writes diffusers reads back, and sample.py draws diffusers' images from it, for
  v-prediction and epsilon; the prediction type's default rule.
"""

import dataclasses
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

import configs
import convert
import delta
import load_sd
import sample
import tiny
import train
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd_v2_ldm.json")
PROMPTS = ["a red circle", ""]
PROMPT = "a red circle"
NEGATIVE = "blue"
SEED = 3
STEPS = 4
GUIDANCE = 7.5
SIZE = 16


def block_shapes(width, mlp):
    """The tensors of one OpenCLIP ResidualAttentionBlock: name -> shape."""
    return {
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (mlp, width),
        "mlp.c_fc.bias": (mlp,),
        "mlp.c_proj.weight": (width, mlp),
        "mlp.c_proj.bias": (width,),
    }


def openclip_tower(vocab, width, mlp, blocks, seed=0):
    """Random tensors of an OpenCLIP text tower under the official SD 2.x names (open_clip's CLIP
    minus its visual tower, as FrozenOpenCLIPEmbedder holds it): `blocks` ResidualAttentionBlocks,
    text_projection, logit_scale."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "token_embedding.weight": (vocab, width),
        "positional_embedding": (77, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, width),
        "logit_scale": (),
    }
    for i in range(blocks):
        for k, shape in block_shapes(width, mlp).items():
            shapes[f"transformer.resblocks.{i}.{k}"] = shape

    # layer-norm gains near 1, the rest small
    norm = re.compile(r".*ln_\w+\.weight")
    tower = {}
    for k, s in shapes.items():
        mean = 1.0 if norm.fullmatch(k) else 0.0
        tower[convert.OPENCLIP + k] = mean + 0.2 * torch.randn(s, generator=g)
    return tower


def openclip_context(tower, ids):
    """FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer by hand: token +
    position embeddings, every residual block but the last (causal attention; ln_1, attention,
    ln_2, c_fc, GELU, c_proj), ln_final."""
    p = convert.OPENCLIP
    x = tower[p + "token_embedding.weight"][ids] + tower[p + "positional_embedding"]
    width = x.shape[-1]
    blocks = len({k.split(".")[4] for k in tower if ".resblocks." in k})
    # open_clip's build_attention_mask
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)

    for i in range(blocks - 1):
        prefix = f"{p}transformer.resblocks.{i}."
        w = {k.removeprefix(prefix): t for k, t in tower.items() if k.startswith(prefix)}
        attn = torch.nn.MultiheadAttention(width, width // configs.CLIP_HEAD_DIM, batch_first=True)
        attn.load_state_dict({k.removeprefix("attn."): t for k, t in w.items() if "attn." in k})

        h = F.layer_norm(x, (width,), w["ln_1.weight"], w["ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]

        h = F.layer_norm(x, (width,), w["ln_2.weight"], w["ln_2.bias"])
        h = F.gelu(F.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"]))
        x = x + F.linear(h, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
    return F.layer_norm(x, (width,), tower[p + "ln_final.weight"], tower[p + "ln_final.bias"])


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """A tiny SD 2.x single file built in the official layout (UNet and VAE of a random diffusers
    pipeline under LDM names, a random OpenCLIP tower, the schedule buffers), and that pipeline's
    folder: the configs diffusers reads the file with (its text encoder one block short of the
    tower, its tokenizer padding with "!", v-prediction)."""
    root = tmp_path_factory.mktemp("tiny-sd2")
    pipe = tiny.pipeline(
        unet_config=tiny.UNET_SD2,
        text=tiny.OPENCLIP,
        pad_token="!",
        prediction_type="v_prediction",
        folder=root / "diffusers",
    )
    unet = configs.config_from_json(UNetConfig, tiny.UNET_SD2)
    vae = configs.config_from_json(VAEConfig, tiny.VAE)
    # LDM's VAE attention is 1x1 convs
    ldm = {
        convert.ours_to_ldm(f"{part}.{k}", unet, vae): t[:, :, None, None]
        if convert.VAE_ATTN_WEIGHT.fullmatch(f"{part}.{k}")
        else t
        for part in ("unet", "vae")
        for k, t in getattr(pipe, part).state_dict().items()
    }
    text = tiny.OPENCLIP
    tower = openclip_tower(
        len(pipe.tokenizer),
        text["hidden_size"],
        text["intermediate_size"],
        text["num_hidden_layers"] + 1,
    )
    save_file({**ldm, **tower, **convert.schedule_buffers()}, root / "sd2.safetensors")
    return SimpleNamespace(
        pipe=pipe,
        folder=root / "diffusers",
        file=root / "sd2.safetensors",
        tower=tower,
        tokenizer=root / "diffusers" / "tokenizer",
    )


def from_single_file(path, folder, **kwargs):
    """diffusers' own reading of a single file (its own OpenCLIP conversion)."""
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_outputs(sd, pipe):
    """Our UNet, VAE decoder and prompt encoding give diffusers' (fp32, 1e-5); the prompts padded
    as its tokenizer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(1, 4, 4, 4, generator=g)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 980])
    close = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sd.unet(x, t, context), pipe.unet(x, t, context).sample, **close)

        decoded = sd.decode_latents(z * pipe.vae.config.scaling_factor)
        torch.testing.assert_close(decoded, pipe.vae.decode(z).sample, **close)

        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        ids = ids.input_ids
        # "!": OpenCLIP pads with 0
        assert ids[1, -1] == pipe.tokenizer.pad_token_id == sd.tokenizer.pad_token_id
        expected = pipe.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(sd.encode_prompts(PROMPTS), expected, **close)
    return ids


def tower_layout(shapes):
    """An OpenCLIP tower's layout: its names with the block numbers as #, each with its rank."""
    return {
        (re.sub(r"\.\d+\.", ".#.", k), len(s))
        for k, s in shapes.items()
        if k.startswith(convert.OPENCLIP)
    }


def test_sd2_single_file_loads_like_diffusers(sd2, tiny_sd):
    """The tiny file's text tower has the official names and ranks; configs from the shapes (64-dim
    heads, GELU, one text layer fewer than the file's blocks), every tensor used or a known unused
    one, outputs equal to diffusers' reading of the file and to OpenCLIP's forward by hand. The
    tokenizer given (SD v1's tiny one) pads with its end token: for an SD 2.x file it pads with
    "!", as OpenCLIP does."""
    with open(FIXTURE) as f:
        official = json.load(f)["tensors"]
    tower_shapes = {k: t.shape for k, t in sd2.tower.items()}
    assert tower_layout(tower_shapes) == tower_layout(official)

    # the configs from the shapes; no metadata: 768-v
    sd = load_sd.load(sd2.file, tokenizer=tiny_sd.tokenizer)
    assert (sd.family, sd.prediction_type, sd.image_size) == ("sd2", "v_prediction", 768)
    fields = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in tiny.UNET_SD2.items()
        if k != "sample_size"
    }
    assert sd.unet.config == dataclasses.replace(UNetConfig.sd2(), sample_size=64, **fields)
    cfg = sd.text_encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_act, cfg.num_attention_heads) == (2, "gelu", 1)

    # every tensor used, or known unused, or one of the 12 schedule buffers
    tensors = load_file(sd2.file)
    unused = sorted(k for k in tensors if convert.unused(k, cfg))
    head = [convert.OPENCLIP + "logit_scale", convert.OPENCLIP + "text_projection"]
    assert unused == sorted([k for k in sd2.tower if ".resblocks.2." in k] + head)
    used = {
        k: t for k, t in tensors.items() if k not in unused and not convert.IGNORED.fullmatch(k)
    }
    assert len(tensors) - len(used) == len(unused) + 12 == 26
    # (q, k, v split: more tensors)
    ours = [p for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.state_dict().values()]
    assert sum(t.numel() for t in used.values()) == sum(p.numel() for p in ours)

    # diffusers' outputs, and OpenCLIP's forward by hand
    diffusers = from_single_file(sd2.file, sd2.folder)
    ids = assert_same_outputs(sd, diffusers)
    with torch.no_grad():
        expected = openclip_context(sd2.tower, ids)
        torch.testing.assert_close(sd.encode_prompts(PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # diffusers read the tower, not the folder's random encoder
    assert torch.equal(
        diffusers.text_encoder.embeddings.token_embedding.weight,
        sd2.tower[convert.OPENCLIP + "token_embedding.weight"],
    )


def test_sd2_full_size_key_coverage():
    """Every key of the official SD 2.x file maps onto our full-size modules (meta device) with its
    shape, fused q, k, v split, or is one of the 12 schedule buffers or the 14 tensors SD 2.x does
    not use; the configs are SD 2.x's and the parameter counts the fixture's less the unused ones;
    the writer gives back those keys and shapes."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    shapes = fixture["tensors"]
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet_cfg, vae_cfg, text_cfg = configs.infer_configs(meta, "sd2")
    assert dataclasses.replace(unet_cfg, sample_size=96) == UNetConfig.sd2()
    assert vae_cfg == VAEConfig.sd()
    # stabilityai/stable-diffusion-2-1's text_encoder/config.json
    openclip_h = dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    assert {k: getattr(text_cfg, k) for k in openclip_h} == openclip_h

    # every key mapped with its shape, or known
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
    unused = sorted(k for k in shapes if convert.unused(k, text_cfg))
    assert ignored == sorted(fixture["model"]["schedule_buffers"])
    head = [convert.OPENCLIP + "logit_scale", convert.OPENCLIP + "text_projection"]
    assert unused == sorted([k for k in shapes if ".resblocks.23." in k] + head)
    mapped = {}
    for k, s in shapes.items():
        if k not in ignored + unused:
            name = convert.ldm_to_ours(k, unet_cfg, vae_cfg, "sd2")
            ours = convert.split_in_proj(name, torch.empty(s, device="meta"))
            mapped.update({n: tuple(t.shape) for n, t in ours.items()})
    assert len(shapes) - len(ignored) - len(unused) == 1240 - 12 - 14
    assert mapped.keys() == expected.keys()
    for k, s in mapped.items():
        # VAE attention: 1x1 convs
        assert (s[:2] if convert.VAE_ATTN_WEIGHT.fullmatch(k) else s) == expected[k], k

    # the parameter counts: the fixture's less the unused ones
    counts = {p: sum(t.numel() for t in m.state_dict().values()) for p, m in modules.items()}
    block = sum(torch.Size(s).numel() for k, s in shapes.items() if ".resblocks.23." in k)
    assert counts == {
        "unet": 865_910_724,
        "vae": 83_653_863,
        "text_encoder": 354_032_641 - block - 1024 * 1024 - 1,
    }
    # diffusers' SD 2.x text encoder (23-layer CLIPTextModel)
    assert counts["text_encoder"] == 340_387_840

    # the writer gives the keys back
    with torch.device("meta"):
        full = load_sd.StableDiffusion(*modules.values(), None, "sd2", "v_prediction", "sd-v2")
    written = {k: list(t.shape) for k, t in load_sd.ldm_state_dict(full).items()}
    assert written == {k: s for k, s in shapes.items() if k not in unused}


def test_sd2_writer_round_trip_read_by_diffusers(sd2, tmp_path):
    """save_single_file writes the official names with q, k, v fused again: bit for bit the file's
    tensors but the unused ones (the model has none to write); diffusers' from_single_file reads it
    into the weights it reads from the original; and we read it back as the same model (no
    text_projection: every block used)."""
    sd = load_sd.load(sd2.file, tokenizer=sd2.tokenizer)
    load_sd.save_single_file(sd, tmp_path / "again.safetensors")
    written = load_file(tmp_path / "again.safetensors")
    original = load_file(sd2.file)
    assert written.keys() == {k for k in original if not convert.unused(k, sd.text_encoder.config)}
    assert all(torch.equal(written[k], original[k]) for k in written)

    # diffusers reads both into the same weights
    ours = from_single_file(tmp_path / "again.safetensors", sd2.folder)
    theirs = from_single_file(sd2.file, sd2.folder)
    for part in ("unet", "vae", "text_encoder"):
        a = getattr(ours, part).state_dict()
        b = getattr(theirs, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    # the metadata the writer wrote: modelspec.prediction_type "v", 768x768
    again = load_sd.load(tmp_path / "again.safetensors", tokenizer=sd2.tokenizer)
    layers = again.text_encoder.config.num_hidden_layers
    assert (layers, again.prediction_type, again.image_size) == (2, "v_prediction", 768)
    assert_same_outputs(again, theirs)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_sd2_sample_matches_diffusers_pipeline(sd2, tmp_path, capsys, prediction):
    """sample.py on a file our writer wrote draws the image StableDiffusionPipeline (DDIMScheduler)
    draws from the same file read by diffusers: v-prediction (the file's metadata), and
    epsilon (--prediction-type)."""
    written = tmp_path / "sd2-written.safetensors"
    load_sd.save_single_file(load_sd.load(sd2.file, tokenizer=sd2.tokenizer), written)
    scheduler = DDIMScheduler(**dict(tiny.SCHEDULER, prediction_type=prediction))
    pipe = from_single_file(written, sd2.folder, scheduler=scheduler)
    with torch.no_grad():
        expected = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]

    # ours
    flags = ["--model", written, "--tokenizer", sd2.tokenizer]
    if prediction != "v_prediction":
        flags += ["--prediction-type", prediction]
    flags += ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", SEED]
    flags += ["--steps", STEPS, "--guidance", GUIDANCE, "--height", SIZE, "--width", SIZE]
    flags += ["--output", tmp_path / "x.png", "--device", "cpu"]
    code = sample.main([str(a) for a in flags])
    assert code == 0, capsys.readouterr().err

    image = np.asarray(Image.open(tmp_path / "x.png")).astype(int)
    diff = np.abs(image - (expected * 255).round().astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}/255"
    print(f"{prediction}: max pixel difference {diff.max()}/255")


def test_prediction_type_rule(sd2, tiny_sd, tmp_path):
    """--prediction-type first; else a folder's scheduler, a file's modelspec.prediction_type; else
    SD 2.x files v at 768 px, SD v1 epsilon at 512. The default size follows: an SD 2.x epsilon
    model is a 512 px base model."""

    def got(source, **kwargs):
        sd = load_sd.load(source, tokenizer=kwargs.pop("tokenizer", sd2.tokenizer), **kwargs)
        return sd.prediction_type, sd.image_size

    assert got(sd2.file) == ("v_prediction", 768)
    assert got(sd2.file, prediction_type="epsilon") == ("epsilon", 512)
    tensors = load_file(sd2.file)
    for stated, expected in (("epsilon", ("epsilon", 512)), ("v", ("v_prediction", 768))):
        save_file(tensors, tmp_path / f"{stated}.safetensors", {configs.PREDICTION: stated})
        assert got(tmp_path / f"{stated}.safetensors") == expected
    # the flag over metadata
    assert got(tmp_path / "v.safetensors", prediction_type="epsilon") == ("epsilon", 512)
    sized = {configs.PREDICTION: "epsilon", configs.RESOLUTION: "640x640"}
    save_file(tensors, tmp_path / "sized.safetensors", sized)
    assert got(tmp_path / "sized.safetensors") == ("epsilon", 640)

    # SD v1, no metadata
    v1 = tmp_path / "v1.safetensors"
    save_file(load_file(tiny_sd.single), v1)
    assert got(v1, tokenizer=tiny_sd.tokenizer) == ("epsilon", 512)
    as_v = got(v1, tokenizer=tiny_sd.tokenizer, prediction_type="v_prediction")
    assert as_v == ("v_prediction", 512)

    # the scheduler's; the folder's sample_size x 2
    assert got(sd2.folder) == ("v_prediction", 16)
    assert got(sd2.folder, prediction_type="epsilon")[0] == "epsilon"
    message = "--prediction-type must be one of epsilon, v_prediction, got 'v'"
    with pytest.raises(load_sd.LoadError, match=message):
        load_sd.load(sd2.file, tokenizer=sd2.tokenizer, prediction_type="v")


def test_esd_x_on_an_sd2_file(sd2, tmp_path):
    """train.py on the SD 2.x file: ESD gets the prediction type (the file's default v, or
    --prediction-type): the default trains what --prediction-type v_prediction trains, bit for bit,
    and epsilon something else; only attn2 tensors train, and --export-full writes an SD 2.x file
    diffusers reads into the edited UNet."""
    full = tmp_path / "full.safetensors"

    def trained(name, flag=(), export=()):
        out = tmp_path / f"{name}.safetensors"
        flags = ["--model", sd2.file, "--tokenizer", sd2.tokenizer, *flag, "--concept", "car"]
        flags += ["--iterations", 2, "--resolution", SIZE, "--steps", 4, "--lr", 1e-3]
        flags += ["--device", "cpu", "--output", out, *export]
        assert train.main([str(a) for a in flags]) == 0
        return delta.load(str(out))[0]

    # the prediction type reaches ESD
    tensors = trained("default", export=["--export-full", full])
    as_v = trained("v", ["--prediction-type", "v_prediction"])
    as_eps = trained("eps", ["--prediction-type", "epsilon"])
    assert tensors.keys() == as_v.keys() == as_eps.keys()
    assert all(torch.equal(tensors[k], as_v[k]) for k in tensors)
    assert not all(torch.equal(tensors[k], as_eps[k]) for k in tensors)

    # only attn2 tensors trained
    base = from_single_file(sd2.file, sd2.folder).unet.state_dict()
    assert set(tensors) == {k for k in base if "attn2" in k}
    assert all(not torch.equal(tensors[k], base[k]) for k in tensors)

    # the full file: the edited UNet
    edited = from_single_file(full, sd2.folder).unet.state_dict()
    assert edited.keys() == base.keys()
    assert all(torch.equal(edited[k], tensors[k] if k in tensors else base[k]) for k in base)
