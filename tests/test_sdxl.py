"""SDXL end to end: the official base 1.0 key list maps onto our full-size modules (meta device) with every tensor used
or known and SDXL's parameter counts; a tiny SDXL diffusers folder loads with diffusers' outputs; prompt encoding (both
encoders' penultimate states, bigG's pooled projection, the six size numbers, zeros for the empty prompt) equals
StableDiffusionXLPipeline.encode_prompt; our writer's single file is the official layout and diffusers'
from_single_file reads it back; sample.py draws StableDiffusionXLPipeline's (DDIM) images from the folder and from that
file; the SDXL VAE stays fp32 under fp16; ESD-x trains only attn2, and its delta and --export-full load into diffusers."""

import json
import os
import re
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
import sample
import tiny
import train
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sdxl_ldm.json")
PROMPTS = ["a red circle", "blue"]
PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE = "a red circle", "blue", 3, 4, 7.5
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny random SDXL diffusers folder (tiny.xl_pipeline) and the same model as an official single file, written
    by our writer from our reading of the folder."""
    root = tmp_path_factory.mktemp("tiny-sdxl")
    pipe = tiny.xl_pipeline(folder=root / "diffusers")
    load_sd.save_single_file(load_sd.load(root / "diffusers"), root / "sdxl.safetensors")
    return SimpleNamespace(
        pipe=pipe,
        folder=root / "diffusers",
        file=root / "sdxl.safetensors",
        tokenizer=root / "diffusers" / "tokenizer",
    )


def from_single_file(path, folder, **kwargs):
    """diffusers' own reading of a single SDXL file, with the folder's configs (its own LDM and OpenCLIP conversion)."""
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, add_watermarker=False, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_state(ours, theirs):
    for part in PARTS:
        a, b = getattr(ours, part).state_dict(), getattr(theirs, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def assert_same_outputs(sd, pipe):
    """Our UNet (with the added conditioning), VAE decoder (SDXL's scaling) and prompt encoding give diffusers'
    (fp32, 1e-5); the six numbers are the pipeline's time ids for the image size."""
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    context = torch.randn(2, 77, tiny.UNET_XL["cross_attention_dim"], generator=g)
    pooled, numbers = (
        torch.randn(2, tiny.XL_POOLED, generator=g),
        torch.tensor([[16.0, 16, 0, 0, 16, 16], [16, 24, 0, 0, 16, 24]]),
    )
    with torch.no_grad():
        expected = pipe.unet(
            x,
            torch.tensor([10, 980]),
            context,
            added_cond_kwargs=dict(text_embeds=pooled, time_ids=numbers),
        ).sample
        torch.testing.assert_close(
            sd.unet(x, torch.tensor([10, 980]), context, torch.cat([pooled, numbers], -1)),
            expected,
            atol=1e-5,
            rtol=1e-5,
        )
        assert sd.vae.config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025
        torch.testing.assert_close(
            sd.decode_latents(z * 0.13025), pipe.vae.decode(z).sample, atol=1e-5, rtol=1e-5
        )
        context, added = sd.encode_prompts(PROMPTS, (16, 24))
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=False
        )
        torch.testing.assert_close(context, embeds, atol=1e-5, rtol=1e-5)  # [2, 77, 64 + 128]
        torch.testing.assert_close(added[:, :-6], pooled, atol=1e-5, rtol=1e-5)
        time_ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, tiny.XL_POOLED)
        assert torch.equal(added[:, -6:], time_ids.expand(2, -1))


def test_sdxl_full_size_key_coverage():
    """Every key of sd_xl_base_1.0.safetensors maps onto our full-size modules (meta device) with its shape, fused q,
    k, v split, bigG's projection transposed, or is CLIP-L's position ids or bigG's unused logit_scale; the configs
    from the shapes are the hub's; the parameter counts SDXL's; the writer gives back those keys and shapes but
    logit_scale; sgm's denoiser.sigmas is known too."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    shapes, hub = fixture["tensors"], fixture["model"]["diffusers_configs"]
    unet_cfg, vae_cfg, *texts = configs.infer_configs(
        {k: torch.empty(s, device="meta") for k, s in shapes.items()}, "sdxl"
    )
    assert (
        unet_cfg == UNetConfig.sdxl()
        and vae_cfg == VAEConfig.sdxl() == configs.config_from_json(VAEConfig, hub["vae"])
    )
    for text, part in zip(texts, ("text_encoder", "text_encoder_2")):
        keys = (
            set(hub[part])
            - {"bos_token_id", "eos_token_id", "pad_token_id"}
            - ({"projection_dim"} if part == "text_encoder" else set())
        )
        assert {k: getattr(text, k) for k in keys} == {k: hub[part][k] for k in keys}, part
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
    assert unused == [convert.XL_OPENCLIP + "logit_scale"] and convert.IGNORED.fullmatch(
        "denoiser.sigmas"
    )
    mapped = {}
    for k, s in shapes.items():
        if k not in ignored + unused:
            name = convert.ldm_to_ours(k, unet_cfg, vae_cfg, "sdxl")
            mapped.update(
                {
                    n: tuple(t.shape)
                    for n, t in convert.to_ours(name, torch.empty(s, device="meta")).items()
                }
            )
    assert (
        len(shapes) == 2515 and mapped == expected
    )  # (the VAE's 1x1 convs and q, k, v in our layout)
    counts = {p: sum(t.numel() for t in m.parameters()) for p, m in modules.items()}
    assert (
        counts
        == {
            "unet": 2_567_463_684,
            "vae": 83_653_863,
            "text_encoder": 123_060_480,
            "text_encoder_2": 694_659_840,
        }
        == fixture["model"]["diffusers_param_counts"]
    )
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
    assert written == {
        k: s for k, s in shapes.items() if k not in unused
    }  # no schedule buffers, as the official file


def test_sdxl_folder_loads_like_diffusers(xl):
    """A diffusers SDXL folder (text_encoder_2, tokenizer_2, a UNet with the added embedding) is family sdxl, its
    size the UNet's sample size x the VAE's 2, its tokenizer_2 padding with "!", outputs diffusers'."""
    sd = load_sd.load(xl.folder)
    assert (sd.family, sd.prediction_type, sd.image_size) == ("sdxl", "epsilon", 16)
    assert (
        isinstance(sd.text_encoder_2, CLIPTextModelWithProjection)
        and sd.tokenizer_2.pad_token == "!"
    )
    assert sd.tokenizer.pad_token == xl.pipe.tokenizer.pad_token != "!"
    assert_same_outputs(sd, xl.pipe)


def test_sdxl_prompt_encoding_matches_encode_prompt(xl):
    """The empty prompt is zeros in the context and the pooled embedding, not in the six numbers: what the pipeline
    gives for a missing negative prompt (force_zeros_for_empty_prompt); an explicit negative prompt is encoded as ours
    is. A single file read with SD v1's tokenizer pads the second encoder's prompts with "!" as OpenCLIP's."""
    pipe = xl.pipe
    with torch.no_grad():
        for sd in (load_sd.load(xl.folder), load_sd.load(xl.file, tokenizer=xl.tokenizer)):
            assert sd.tokenizer_2.pad_token == "!" and sd.tokenizer.pad_token == "<|endoftext|>"
            context, added = sd.encode_prompts(["", NEGATIVE, PROMPT])
            embeds, zeros, pooled, zero_pooled = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True
            )
            assert (
                not zeros.any()
                and not zero_pooled.any()
                and not context[0].any()
                and not added[0, :-6].any()
            )
            assert torch.equal(
                added[0, -6:], torch.tensor([16.0, 16, 0, 0, 16, 16])
            )  # the model's size by default
            torch.testing.assert_close(context[2:], embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(added[2:, :-6], pooled, atol=1e-5, rtol=1e-5)
            _, negative, _, negative_pooled = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
            )
            torch.testing.assert_close(context[1:2], negative, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(added[1:2, :-6], negative_pooled, atol=1e-5, rtol=1e-5)
            explicit = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=""
            )
            assert (
                explicit[1].any()
            )  # diffusers encodes an explicit "" as text (we: zeros, the model's "no caption")


def test_sdxl_single_file_written_read_by_diffusers(xl, tmp_path):
    """Our writer writes the official SDXL layout (the fixture's names at tiny size, no schedule buffers, CLIP-L's
    position ids, bigG's fused q, k, v and x @ P projection, the model-spec size); diffusers' from_single_file reads it
    into the folder's weights, and we read it back with every tensor used; sgm's denoiser.sigmas and bigG's logit_scale
    are known tensors, a stray one is refused."""
    with open(FIXTURE) as f:
        official = json.load(f)["tensors"]
    layout = lambda keys: {(re.sub(r"\.\d+\.", ".#.", k), len(keys[k])) for k in keys}  # noqa: E731
    tensors = load_file(xl.file)
    assert layout({k: t.shape for k, t in tensors.items()}) == layout(official) - layout(
        {convert.XL_OPENCLIP + "logit_scale": []}
    )
    projection = tensors[convert.XL_OPENCLIP + "text_projection"]
    assert projection.shape == (
        tiny.BIG_G["hidden_size"],
        tiny.XL_POOLED,
    )  # open_clip's [width, embed_dim]
    assert torch.equal(projection, xl.pipe.text_encoder_2.text_projection.weight.T)
    assert load_sd.read_metadata(xl.file)[load_sd.RESOLUTION] == "16x16"
    assert_same_state(
        from_single_file(xl.file, xl.folder), xl.pipe
    )  # (diffusers loads text encoders non-strict)
    sd = load_sd.load(xl.file, tokenizer=xl.tokenizer)
    assert (sd.family, sd.prediction_type, sd.image_size) == ("sdxl", "epsilon", 16)
    assert_same_state(sd, xl.pipe)
    ours = sum(p.numel() for part in PARTS for p in getattr(sd, part).state_dict().values())
    assert ours == sum(t.numel() for k, t in tensors.items() if not k.endswith("position_ids"))
    assert_same_outputs(sd, xl.pipe)
    extras = {
        "denoiser.sigmas": torch.ones(1000),
        convert.XL_OPENCLIP + "logit_scale": torch.tensor(4.6055),
    }
    save_file({**tensors, **extras}, tmp_path / "sgm.safetensors")
    assert_same_state(load_sd.load(tmp_path / "sgm.safetensors", tokenizer=xl.tokenizer), xl.pipe)
    save_file(
        {**tensors, "conditioner.embedders.1.model.extra": torch.zeros(1)},
        tmp_path / "stray.safetensors",
    )
    with pytest.raises(
        load_sd.LoadError,
        match="1 tensors of no SDXL part, e.g. conditioner.embedders.1.model.extra",
    ):
        load_sd.load(tmp_path / "stray.safetensors", tokenizer=xl.tokenizer)


def test_sdxl_diffusers_writer_round_trip(xl, tmp_path):
    """save_diffusers (train.py --export-diffusers) writes a StableDiffusionXLPipeline folder: diffusers reads it into
    the original weights (its second text encoder and tokenizer too), zeros for the empty prompt in its model_index."""
    load_sd.save_diffusers(load_sd.load(xl.file, tokenizer=xl.tokenizer), tmp_path / "written")
    with open(tmp_path / "written" / "model_index.json") as f:
        index = json.load(f)
    assert (
        index["_class_name"] == "StableDiffusionXLPipeline"
        and index["force_zeros_for_empty_prompt"] is True
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "written", add_watermarker=False)
    assert_same_state(pipe, xl.pipe)
    assert (
        pipe.tokenizer_2.pad_token == "!"
        and pipe.tokenizer.pad_token == xl.pipe.tokenizer.pad_token
    )
    assert_same_state(load_sd.load(tmp_path / "written"), xl.pipe)


@pytest.mark.parametrize("source", ["folder", "file"])
def test_sdxl_sample_matches_diffusers_pipeline(xl, tmp_path, capsys, source):
    """sample.py draws StableDiffusionXLPipeline's (DDIMScheduler) image, within 1/255: from the folder at the model's
    size (no --height/--width, the empty negative prompt: zeros), and from our written file read by diffusers at
    16x24 with a negative prompt (the six numbers from a non-square size)."""
    scheduler = DDIMScheduler(**tiny.SCHEDULER)
    if source == "folder":
        pipe = StableDiffusionXLPipeline.from_pretrained(
            xl.folder, scheduler=scheduler, add_watermarker=False
        )
        pipe.set_progress_bar_config(disable=True)
        kwargs, flags = {}, ["--model", xl.folder]
    else:
        pipe = from_single_file(xl.file, xl.folder, scheduler=scheduler)
        kwargs = dict(negative_prompt=NEGATIVE, height=16, width=24)
        flags = [
            "--model",
            xl.file,
            "--tokenizer",
            xl.tokenizer,
            "--negative-prompt",
            NEGATIVE,
            "--height",
            16,
            "--width",
            24,
        ]
    with torch.no_grad():
        expected = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(SEED),
            **kwargs,
        ).images[0]
    code = sample.main(
        [
            str(a)
            for a in [
                *flags,
                "--prompt",
                PROMPT,
                "--seed",
                SEED,
                "--steps",
                STEPS,
                "--guidance",
                GUIDANCE,
                "--output",
                tmp_path / "x.png",
                "--device",
                "cpu",
            ]
        ]
    )
    assert code == 0, capsys.readouterr().err
    image = np.asarray(Image.open(tmp_path / "x.png")).astype(int)
    assert image.shape == expected.shape == ((16, 16, 3) if source == "folder" else (16, 24, 3))
    diff = np.abs(image - (expected * 255).round().astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}/255"
    print(f"{source}: max pixel difference {diff.max()}/255")


def test_sdxl_vae_stays_fp32_under_fp16(xl):
    """Loaded in fp16, SDXL's VAE is kept in fp32 (its activations overflow fp16) and decodes fp16 latents in fp32;
    bf16 (an 8-bit exponent) keeps the VAE in bf16, as diffusers' pipeline does."""
    fp16, fp32 = load_sd.load(xl.folder, dtype=torch.float16), load_sd.load(xl.folder)
    dtypes = lambda module: {p.dtype for p in module.parameters()}  # noqa: E731
    assert dtypes(fp16.unet) == dtypes(fp16.text_encoder_2) == {torch.float16} and dtypes(
        fp16.vae
    ) == {torch.float32}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = fp16.decode_latents(z.half())
    assert image.dtype == torch.float32
    torch.testing.assert_close(image, fp32.decode_latents(z.half().float()), atol=1e-5, rtol=1e-5)
    assert dtypes(load_sd.load(xl.folder, dtype=torch.bfloat16).vae) == {torch.bfloat16}


def test_esd_x_on_tiny_sdxl(xl, tmp_path):
    """train.py on the SDXL file (x_t sampled with SDXL's conditioning at the model's size): only attn2 tensors train,
    the delta loads into diffusers' SDXL UNet with no unexpected keys, and --export-full writes an SDXL file diffusers
    reads into the edited UNet (the other parts as they were). ESD-u leaves both time embeddings alone."""
    out, full = tmp_path / "d.safetensors", tmp_path / "full.safetensors"
    assert (
        train.main(
            [
                str(a)
                for a in [
                    "--model",
                    xl.file,
                    "--tokenizer",
                    xl.tokenizer,
                    "--concept",
                    "car",
                    "--iterations",
                    2,
                    "--steps",
                    4,
                    "--lr",
                    1e-3,
                    "--device",
                    "cpu",
                    "--output",
                    out,
                    "--export-full",
                    full,
                ]
            ]
        )
        == 0
    )
    tensors = delta.load(str(out))[0]
    base = xl.pipe.unet.state_dict()
    assert set(tensors) == {k for k in base if "attn2" in k} and all(
        not torch.equal(tensors[k], base[k]) for k in tensors
    )
    unet = UNet2DConditionModel(**tiny.UNET_XL)
    result = unet.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == base.keys() - tensors.keys()
    edited = from_single_file(full, xl.folder)
    assert all(
        torch.equal(edited.unet.state_dict()[k], tensors[k] if k in tensors else base[k])
        for k in base
    )
    for part in ("vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(edited, part).state_dict(), getattr(xl.pipe, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), part
    names = set(esd.select(load_sd.load(xl.folder).unet, "esd-u"))
    assert not any(
        n.startswith(("time_embedding.", "add_embedding.", "conv_out.", "conv_norm_out."))
        for n in names
    )
    assert not any("attn2" in n for n in names) and any(
        n.startswith("down_blocks.0.resnets.0.") for n in names
    )
