"""SDXL end to end.

- The official base 1.0 key list maps onto our full-size modules (meta device) with every tensor
  used or known and SDXL's parameter counts.
- A tiny SDXL diffusers folder loads with diffusers' outputs; prompt encoding (both encoders'
  penultimate states, bigG's pooled projection, the six size numbers, zeros for the empty prompt)
  equals StableDiffusionXLPipeline.encode_prompt.
- Our writer's single file is the official layout and diffusers' from_single_file reads it back;
  a small SDXL's size-number width comes from its shapes, a width no rule explains is one line.
- sample.py draws StableDiffusionXLPipeline's (DDIM) images from the folder and from that file;
  the SDXL VAE stays fp32 under fp16.
- ESD-x trains only attn2, and its delta and --export-full load into diffusers.
"""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import configs
import convert
import delta
import esd
import load_sd
import lora
import sample
import tiny
import train
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "sdxl_ldm.json")
PROMPTS = ["a red circle", "blue"]
PROMPT = "a red circle"
NEGATIVE = "blue"
SEED = 3
STEPS = 4
GUIDANCE = 7.5
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
LABEL = "model.diffusion_model.label_emb.0.0.weight"  # SDXL's added embedding, [out, in]


def tiny_sdxl(root, unet_config=tiny.UNET_XL):
    """A tiny random SDXL diffusers folder (tiny.xl_pipeline) and the same model as an official
    single file, written by our writer from our reading of the folder."""
    pipe = tiny.xl_pipeline(folder=root / "diffusers", unet_config=unet_config)
    load_sd.save_single_file(load_sd.load(root / "diffusers"), root / "sdxl.safetensors")
    return SimpleNamespace(
        pipe=pipe,
        folder=root / "diffusers",
        file=root / "sdxl.safetensors",
        tokenizer=root / "diffusers" / "tokenizer",
    )


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A small SDXL: its size numbers' sinusoidal width is 8 (tiny.UNET_XL_NARROW)."""
    return tiny_sdxl(tmp_path_factory.mktemp("narrow-sdxl"), tiny.UNET_XL_NARROW)


def from_single_file(path, folder, **kwargs):
    """diffusers' own reading of a single SDXL file, with the folder's configs (its own LDM and
    OpenCLIP conversion)."""
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, add_watermarker=False, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_state(ours, theirs):
    for part in PARTS:
        a = getattr(ours, part).state_dict()
        b = getattr(theirs, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def assert_same_outputs(sd, pipe):
    """Our UNet (with the added conditioning), VAE decoder (SDXL's scaling) and prompt encoding
    give diffusers' (fp32, 1e-5); the six numbers are the pipeline's time ids of the
    image's size."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(1, 4, 4, 4, generator=g)
    context = torch.randn(2, 77, tiny.UNET_XL["cross_attention_dim"], generator=g)
    pooled = torch.randn(2, tiny.XL_POOLED, generator=g)
    numbers = torch.tensor([[16.0, 16, 0, 0, 16, 16], [16, 24, 0, 0, 16, 24]])
    t = torch.tensor([10, 980])

    with torch.no_grad():
        # the UNet
        added_kwargs = dict(text_embeds=pooled, time_ids=numbers)
        expected = pipe.unet(x, t, context, added_cond_kwargs=added_kwargs).sample
        ours = sd.unet(x, t, context, torch.cat([pooled, numbers], -1))
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

        # the VAE decoder
        assert sd.vae.config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025
        torch.testing.assert_close(
            sd.decode_latents(z * 0.13025), pipe.vae.decode(z).sample, atol=1e-5, rtol=1e-5
        )

        # the prompts
        context, added = sd.encode_prompts(PROMPTS, (16, 24))
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=False
        )
        torch.testing.assert_close(context, embeds, atol=1e-5, rtol=1e-5)  # [2, 77, 64 + 128]
        torch.testing.assert_close(added[:, :-6], pooled, atol=1e-5, rtol=1e-5)
        time_ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, tiny.XL_POOLED)
        assert torch.equal(added[:, -6:], time_ids.expand(2, -1))


def test_sdxl_full_size_key_coverage():
    """Every key of sd_xl_base_1.0.safetensors maps onto our full-size modules (meta device) with
    its shape, fused q, k, v split, bigG's projection transposed, or is CLIP-L's position ids or
    bigG's unused logit_scale; the configs from the shapes are the hub's; the parameter counts
    SDXL's; the writer gives back those keys and shapes but logit_scale; sgm's denoiser.sigmas is
    known too."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    shapes = fixture["tensors"]
    hub = fixture["model"]["diffusers_configs"]

    # the configs from the shapes are the hub's
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet_cfg, vae_cfg, *texts = configs.infer_configs(meta, "sdxl")
    assert unet_cfg == UNetConfig.sdxl()
    assert vae_cfg == VAEConfig.sdxl() == configs.config_from_json(VAEConfig, hub["vae"])
    for text, part in zip(texts, ("text_encoder", "text_encoder_2")):
        keys = set(hub[part]) - {"bos_token_id", "eos_token_id", "pad_token_id"}
        if part == "text_encoder":
            keys -= {"projection_dim"}
        assert {k: getattr(text, k) for k in keys} == {k: hub[part][k] for k in keys}, part

    # every key is mapped onto our modules with its shape, or known
    with torch.device("meta"):
        modules = {
            "unet": UNet(unet_cfg),
            "vae": VAE(vae_cfg),
            "text_encoder": CLIPTextModel(texts[0]),
            "text_encoder_2": CLIPTextModelWithProjection(texts[1]),
        }
    expected = {
        f"{p}.{k}": tuple(t.shape) for p, m in modules.items() for k, t in m.state_dict().items()
    }
    ignored = sorted(k for k in shapes if convert.IGNORED.fullmatch(k))
    unused = sorted(k for k in shapes if convert.unused(k, texts[0]))
    assert ignored == [convert.XL_CLIP + "text_model.embeddings.position_ids"]
    assert unused == [convert.XL_OPENCLIP + "logit_scale"]
    assert convert.IGNORED.fullmatch("denoiser.sigmas")
    mapped = {}
    for k, s in shapes.items():
        if k not in ignored + unused:
            name = convert.ldm_to_ours(k, unet_cfg, vae_cfg, "sdxl")
            ours = convert.to_ours(name, torch.empty(s, device="meta"))
            mapped.update({n: tuple(t.shape) for n, t in ours.items()})
    # (the VAE's 1x1 convs and q, k, v in our layout)
    assert len(shapes) == 2515 and mapped == expected

    # SDXL's parameter counts
    counts = {p: sum(t.numel() for t in m.parameters()) for p, m in modules.items()}
    assert counts == fixture["model"]["diffusers_param_counts"]
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }

    # the writer gives the keys back, with no schedule buffers, as the official file
    with torch.device("meta"):
        full = load_sd.StableDiffusion(
            modules["unet"],
            modules["vae"],
            modules["text_encoder"],
            None,
            "sdxl",
            "epsilon",
            "sdxl",
            1024,
            modules["text_encoder_2"],
        )
    written = {k: list(t.shape) for k, t in load_sd.ldm_state_dict(full).items()}
    assert written == {k: s for k, s in shapes.items() if k not in unused}


def test_sdxl_folder_loads_like_diffusers(xl):
    """A diffusers SDXL folder (text_encoder_2, tokenizer_2, a UNet with the added embedding) is
    family sdxl, its size the UNet's sample size x the VAE's 2, its tokenizer_2 padding with "!",
    outputs diffusers'."""
    sd = load_sd.load(xl.folder)
    assert (sd.family, sd.prediction_type, sd.image_size) == ("sdxl", "epsilon", 16)
    assert isinstance(sd.text_encoder_2, CLIPTextModelWithProjection)
    assert sd.tokenizer_2.pad_token == "!"
    assert sd.tokenizer.pad_token == xl.pipe.tokenizer.pad_token != "!"
    assert_same_outputs(sd, xl.pipe)


def test_sdxl_prompt_encoding_matches_encode_prompt(xl):
    """The empty prompt is zeros in the context and the pooled embedding, not in the six numbers:
    what the pipeline gives for a missing negative prompt (force_zeros_for_empty_prompt); an
    explicit negative prompt is encoded as ours is. A single file read with SD v1's tokenizer pads
    the second encoder's prompts with "!" as OpenCLIP's."""
    pipe = xl.pipe
    with torch.no_grad():
        for sd in (load_sd.load(xl.folder), load_sd.load(xl.file, tokenizer=xl.tokenizer)):
            assert sd.tokenizer_2.pad_token == "!" and sd.tokenizer.pad_token == "<|endoftext|>"
            context, added = sd.encode_prompts(["", NEGATIVE, PROMPT])

            # no negative prompt: zeros, but for the size numbers (the model's size by default)
            embeds, zeros, pooled, zero_pooled = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True
            )
            assert not zeros.any() and not zero_pooled.any()
            assert not context[0].any() and not added[0, :-6].any()
            assert torch.equal(added[0, -6:], torch.tensor([16.0, 16, 0, 0, 16, 16]))
            torch.testing.assert_close(context[2:], embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(added[2:, :-6], pooled, atol=1e-5, rtol=1e-5)

            # an explicit negative prompt
            _, negative, _, negative_pooled = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
            )
            torch.testing.assert_close(context[1:2], negative, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(added[1:2, :-6], negative_pooled, atol=1e-5, rtol=1e-5)

            # diffusers encodes an explicit "" as text (we: zeros, the model's "no caption")
            explicit = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=""
            )
            assert explicit[1].any()


def layout(shapes):
    """A state dict's layout: its names with the block numbers as #, each with its rank."""
    return {(re.sub(r"\.\d+\.", ".#.", k), len(shape)) for k, shape in shapes.items()}


def test_sdxl_single_file_written_read_by_diffusers(xl, tmp_path):
    """Our writer writes the official SDXL layout (the fixture's names at tiny size, no schedule
    buffers, CLIP-L's position ids, bigG's fused q, k, v and x @ P projection, the model-spec
    size); diffusers' from_single_file reads it into the folder's weights, and we read it back with
    every tensor used; sgm's denoiser.sigmas and bigG's logit_scale are known tensors, a stray one
    is refused."""
    with open(FIXTURE) as f:
        official = json.load(f)["tensors"]
    tensors = load_file(xl.file)

    # the official layout
    logit_scale = {convert.XL_OPENCLIP + "logit_scale": []}
    written = {k: t.shape for k, t in tensors.items()}
    assert layout(written) == layout(official) - layout(logit_scale)
    projection = tensors[convert.XL_OPENCLIP + "text_projection"]
    # open_clip's [width, embed_dim]
    assert projection.shape == (tiny.BIG_G["hidden_size"], tiny.XL_POOLED)
    assert torch.equal(projection, xl.pipe.text_encoder_2.text_projection.weight.T)
    assert load_sd.read_metadata(xl.file)[configs.RESOLUTION] == "16x16"

    # read by diffusers (which loads text encoders non-strict) and by us
    assert_same_state(from_single_file(xl.file, xl.folder), xl.pipe)
    sd = load_sd.load(xl.file, tokenizer=xl.tokenizer)
    assert (sd.family, sd.prediction_type, sd.image_size) == ("sdxl", "epsilon", 16)
    assert_same_state(sd, xl.pipe)
    ours = sum(p.numel() for part in PARTS for p in getattr(sd, part).state_dict().values())
    assert ours == sum(t.numel() for k, t in tensors.items() if not k.endswith("position_ids"))
    assert_same_outputs(sd, xl.pipe)

    # known tensors are ignored, a stray one is refused
    extras = {
        "denoiser.sigmas": torch.ones(1000),
        convert.XL_OPENCLIP + "logit_scale": torch.tensor(4.6055),
    }
    save_file({**tensors, **extras}, tmp_path / "sgm.safetensors")
    assert_same_state(load_sd.load(tmp_path / "sgm.safetensors", tokenizer=xl.tokenizer), xl.pipe)
    stray = {**tensors, "conditioner.embedders.1.model.extra": torch.zeros(1)}
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(
        load_sd.LoadError,
        match="1 tensors of no SDXL part, e.g. conditioner.embedders.1.model.extra",
    ):
        load_sd.load(tmp_path / "stray.safetensors", tokenizer=xl.tokenizer)


def test_sdxl_size_embedding_width_from_shapes(narrow, tmp_path):
    """A small or distilled SDXL single file, its label_emb taking pooled + 6 x 8 inputs (not SDXL
    base's 6 x 256): d = 8 comes from the shapes, the model gives diffusers' outputs (the UNet with
    the added conditioning too), and sample.py draws with it."""
    assert load_file(narrow.file)[LABEL].shape[1] == tiny.XL_POOLED + 6 * 8
    sd = load_sd.load(narrow.file, tokenizer=narrow.tokenizer)
    assert sd.unet.config.addition_time_embed_dim == 8
    assert sd.unet.config.projection_class_embeddings_input_dim == tiny.XL_POOLED + 6 * 8
    assert_same_state(sd, narrow.pipe)
    assert_same_outputs(sd, narrow.pipe)

    flags = ["--model", narrow.file, "--tokenizer", narrow.tokenizer, "--prompt", PROMPT]
    flags += ["--steps", 2, "--output", tmp_path / "x.png", "--device", "cpu"]
    assert sample.main([str(a) for a in flags]) == 0
    assert Image.open(tmp_path / "x.png").size == (16, 16)


# label_emb input widths no even d explains: pooled + 6 d + 1, an odd d, no d at all
UNEXPLAINED = [tiny.XL_POOLED + 6 * 8 + 1, tiny.XL_POOLED + 6 * 7, tiny.XL_POOLED]


def unexplained_file(narrow, path, inputs):
    """The small SDXL file with a label_emb of `inputs` inputs; its message when loaded."""
    tensors = load_file(narrow.file)
    tensors[LABEL] = torch.zeros(tensors[LABEL].shape[0], inputs)
    save_file(tensors, path)
    return (
        f"{path}: SDXL's added embedding (label_emb.0.0) takes {inputs} inputs, not the pooled "
        f"text's {tiny.XL_POOLED} plus 6 size embeddings of one even width"
    )


@pytest.mark.parametrize("inputs", UNEXPLAINED)
def test_sdxl_unexplained_added_width_is_one_line(narrow, tmp_path, inputs):
    """An SDXL file whose label_emb width no rule explains fails at load (LoadError), with the
    widths, not at the first UNet call."""
    message = unexplained_file(narrow, tmp_path / "bad.safetensors", inputs)
    with pytest.raises(load_sd.LoadError) as error:
        load_sd.load(tmp_path / "bad.safetensors", tokenizer=narrow.tokenizer)
    assert str(error.value) == message


def test_sdxl_unexplained_added_width_cli(narrow, tmp_path):
    """`python sample.py --model FILE` with such a file: exit 2, one stderr line, no traceback."""
    path = tmp_path / "bad.safetensors"
    message = unexplained_file(narrow, path, UNEXPLAINED[0])
    command = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", path]
    command += ["--tokenizer", narrow.tokenizer, "--prompt", PROMPT, "--device", "cpu"]
    command += ["--output", tmp_path / "x.png"]
    run = subprocess.run(
        [str(a) for a in command],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"error: {message}"]
    assert not os.path.exists(tmp_path / "x.png")


def test_sdxl_folder_added_width_is_checked(xl, tmp_path):
    """A diffusers SDXL folder whose config states an addition_time_embed_dim its added
    embedding's width does not have fails at load, in one line."""
    load_sd.save_diffusers(load_sd.load(xl.folder), tmp_path / "folder")
    with open(tmp_path / "folder" / "unet" / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "folder" / "unet" / "config.json", "w") as f:
        json.dump(dict(config, addition_time_embed_dim=8), f)
    with pytest.raises(load_sd.LoadError) as error:
        load_sd.load(tmp_path / "folder")
    assert str(error.value) == (
        f"{tmp_path / 'folder'} is not a diffusers SD folder we can load: ValueError: "
        f"SDXL's added embedding takes {tiny.XL_POOLED + 6 * 256} inputs, not the pooled "
        f"text's {tiny.XL_POOLED} plus 6 x addition_time_embed_dim 8"
    )


def test_sdxl_diffusers_writer_round_trip(xl, tmp_path):
    """save_diffusers (train.py --export-diffusers) writes a StableDiffusionXLPipeline folder:
    diffusers reads it into the original weights (its second text encoder and tokenizer too),
    zeros for the empty prompt in its model_index."""
    load_sd.save_diffusers(load_sd.load(xl.file, tokenizer=xl.tokenizer), tmp_path / "written")
    with open(tmp_path / "written" / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True

    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "written", add_watermarker=False)
    assert_same_state(pipe, xl.pipe)
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer.pad_token == xl.pipe.tokenizer.pad_token
    assert_same_state(load_sd.load(tmp_path / "written"), xl.pipe)


@pytest.mark.parametrize("source", ["folder", "file"])
def test_sdxl_sample_matches_diffusers_pipeline(xl, tmp_path, capsys, source):
    """sample.py draws StableDiffusionXLPipeline's (DDIMScheduler) image, within 1/255: from the
    folder at the model's size (no --height/--width, the empty negative prompt: zeros), and from
    our written file read by diffusers at 16x24 with a negative prompt (the six numbers from a
    non-square size)."""
    scheduler = DDIMScheduler(**tiny.SCHEDULER)
    if source == "folder":
        pipe = StableDiffusionXLPipeline.from_pretrained(
            xl.folder, scheduler=scheduler, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        kwargs = {}
        flags = ["--model", xl.folder]
    else:
        pipe = from_single_file(xl.file, xl.folder, scheduler=scheduler)
        kwargs = dict(negative_prompt=NEGATIVE, height=16, width=24)
        flags = ["--model", xl.file, "--tokenizer", xl.tokenizer, "--negative-prompt", NEGATIVE]
        flags += ["--height", 16, "--width", 24]

    # diffusers' image
    with torch.no_grad():
        expected = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(SEED),
            **kwargs,
        ).images[0]

    # ours
    flags += ["--prompt", PROMPT, "--seed", SEED, "--steps", STEPS, "--guidance", GUIDANCE]
    flags += ["--output", tmp_path / "x.png", "--device", "cpu"]
    code = sample.main([str(a) for a in flags])
    assert code == 0, capsys.readouterr().err

    image = np.asarray(Image.open(tmp_path / "x.png")).astype(int)
    assert image.shape == expected.shape == ((16, 16, 3) if source == "folder" else (16, 24, 3))
    diff = np.abs(image - (expected * 255).round().astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}/255"
    print(f"{source}: max pixel difference {diff.max()}/255")


def dtypes(module):
    return {p.dtype for p in module.parameters()}


def test_sdxl_vae_stays_fp32_under_fp16(xl):
    """Loaded in fp16, SDXL's VAE is kept in fp32 (its activations overflow fp16) and decodes fp16
    latents in fp32; bf16 (an 8-bit exponent) keeps the VAE in bf16, as diffusers'
    pipeline does."""
    fp16 = load_sd.load(xl.folder, dtype=torch.float16)
    fp32 = load_sd.load(xl.folder)
    assert dtypes(fp16.unet) == dtypes(fp16.text_encoder_2) == {torch.float16}
    assert dtypes(fp16.vae) == {torch.float32}

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = fp16.decode_latents(z.half())
    assert image.dtype == torch.float32
    torch.testing.assert_close(image, fp32.decode_latents(z.half().float()), atol=1e-5, rtol=1e-5)

    assert dtypes(load_sd.load(xl.folder, dtype=torch.bfloat16).vae) == {torch.bfloat16}


def test_esd_x_on_tiny_sdxl(xl, tmp_path):
    """train.py on the SDXL file (x_t sampled with SDXL's conditioning at the model's size): only
    attn2 tensors train, the delta loads into diffusers' SDXL UNet with no unexpected keys, and
    --export-full writes an SDXL file diffusers reads into the edited UNet (the other parts as
    they were). ESD-u leaves both time embeddings alone."""
    out = tmp_path / "d.safetensors"
    full = tmp_path / "full.safetensors"
    flags = ["--model", xl.file, "--tokenizer", xl.tokenizer, "--concept", "car"]
    flags += ["--iterations", 2, "--steps", 4, "--lr", 1e-3, "--device", "cpu"]
    flags += ["--output", out, "--export-full", full]
    assert train.main([str(a) for a in flags]) == 0

    # only attn2 tensors trained, and the delta loads into diffusers' UNet
    tensors = delta.load(str(out))[0]
    base = xl.pipe.unet.state_dict()
    assert set(tensors) == {k for k in base if "attn2" in k}
    assert all(not torch.equal(tensors[k], base[k]) for k in tensors)
    unet = UNet2DConditionModel(**tiny.UNET_XL)
    result = unet.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == base.keys() - tensors.keys()

    # the full file: the edited UNet, the other parts as they were
    edited = from_single_file(full, xl.folder)
    assert all(
        torch.equal(edited.unet.state_dict()[k], tensors[k] if k in tensors else base[k])
        for k in base
    )
    for part in ("vae", "text_encoder", "text_encoder_2"):
        a = getattr(edited, part).state_dict()
        b = getattr(xl.pipe, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), part

    # ESD-u leaves the embeddings and the output layers alone
    names = set(esd.select(load_sd.load(xl.folder).unet, "esd-u"))
    kept = ("time_embedding.", "add_embedding.", "conv_out.", "conv_norm_out.")
    assert not any(n.startswith(kept) for n in names)
    assert not any("attn2" in n for n in names)
    assert any(n.startswith("down_blocks.0.resnets.0.") for n in names)


def test_sdxl_lora_read_by_diffusers_draws_our_image(xl, tmp_path, capsys):
    """train.py --lora on the SDXL folder (ESD-u: Linear and Conv2d modules): diffusers'
    load_lora_weights gives every module of the file its A and B as written, and
    StableDiffusionXLPipeline with it draws sample.py --delta's image within 1/255."""
    out = tmp_path / "lora.safetensors"
    flags = ["--model", xl.folder, "--concept", "car", "--method", "esd-u", "--lora", 2]
    flags += ["--iterations", 2, "--steps", 4, "--lr", 0.3, "--device", "cpu", "--output", out]
    assert train.main([str(a) for a in flags]) == 0
    tensors = load_file(out)
    assert all(k.startswith(lora.PREFIX) for k in tensors)
    assert delta.load(str(out))[1]["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    pipe = StableDiffusionXLPipeline.from_pretrained(
        xl.folder, scheduler=DDIMScheduler(**tiny.SCHEDULER), add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    loaded = {}
    for path, m in pipe.unet.named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A):
            (adapter,) = m.lora_A.keys()
            loaded[lora.kohya_name(path)] = (m.lora_A[adapter].weight, m.lora_B[adapter].weight)
    assert len(tensors) == 3 * len(loaded)
    for name, (a, b) in loaded.items():
        assert torch.equal(a, tensors[name + lora.DOWN]) and torch.equal(b, tensors[name + lora.UP])

    with torch.no_grad():
        expected = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]
    flags = ["--model", xl.folder, "--prompt", PROMPT, "--seed", SEED, "--steps", STEPS]
    flags += ["--guidance", GUIDANCE, "--output", tmp_path / "x.png", "--device", "cpu"]
    assert sample.main([str(a) for a in [*flags, "--delta", out]]) == 0, capsys.readouterr().err
    image = np.asarray(Image.open(tmp_path / "x.png")).astype(int)
    diff = np.abs(image - (expected * 255).round().astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}/255"

    # ... and the LoRA shows in the image
    assert sample.main([str(a) for a in flags]) == 0
    base = np.asarray(Image.open(tmp_path / "x.png")).astype(int)
    assert np.abs(base - image).max() > 4
