"""Tiny random Stable Diffusion parts for the tests: configs in diffusers' config.json
spelling (so the same dict builds our modules and diffusers' oracle), a character-level
CLIP tokenizer written from scratch, and a tiny CLIP text encoder.

SD constants are kept where single-file loading infers from them (GroupNorm 32 groups,
SD v1's 8 heads, CLIP's 64-dim heads), so a tiny checkpoint loads exactly like a real one.
"""

import json
import os

# SD v1 layout in miniature: attention on all levels but the last, 2 resnets per level
# (so the LDM index arithmetic n = layers_per_block + 1 = 3 is exercised), 8 heads.
UNET_V1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)
# SD v2 layout in miniature: linear proj_in/proj_out, heads given per level
# (diffusers' `attention_head_dim` is a head *count*, as in SD v2's [5, 10, 20, 20]).
UNET_V2 = dict(
    UNET_V1,
    attention_head_dim=[2, 4, 4],
    use_linear_projection=True,
    cross_attention_dim=128,
    layers_per_block=1,
)
# SD 2.x as a single file tells it: 64-dim heads (so channels in multiples of 64), linear
# projections, and the context width of OpenCLIP's text encoder below.
UNET_SD2 = dict(
    UNET_V1,
    block_out_channels=[64, 64, 128],
    attention_head_dim=[1, 1, 2],
    use_linear_projection=True,
    cross_attention_dim=64,
    layers_per_block=1,
)
# SDXL layout in miniature: no attention at the first level, transformer depth per level (the
# first unused, the middle block's is the last level's), linear projections and SDXL's 64-dim heads
# (1 and 2 heads here), the added conditioning: pooled text (XL_POOLED wide) and 6 size numbers of
# SDXL's sinusoidal width 256; the context is the two text encoders' (CLIP 64 + BIG_G 128) side by
# side.
XL_POOLED = 32  # SDXL's: 1280 (OpenCLIP bigG's projection)
UNET_XL = dict(
    UNET_V1,
    block_out_channels=[64, 64, 128],
    cross_attention_dim=64 + 128,
    attention_head_dim=[1, 1, 2],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 3],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=XL_POOLED + 6 * 256,
)
# A small or distilled SDXL: the size numbers' sinusoidal width is 8, not SDXL base's 256.
UNET_XL_NARROW = dict(
    UNET_XL,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=XL_POOLED + 6 * 8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    block_out_channels=[32, 64],
    norm_num_groups=32,
    sample_size=16,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)
# CLIP text encoder: 64-dim heads as in CLIP, so a single-file load infers 1 head.
CLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=1,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
# OpenCLIP's text encoder as diffusers' SD 2.x holds it: the layers SD 2.x uses (the file's tower
# has one more), GELU.
OPENCLIP = dict(CLIP, hidden_act="gelu")
# SDXL's second text encoder in miniature: OpenCLIP bigG as diffusers holds it
# (CLIPTextModelWithProjection), GELU, 64-dim heads, a projection to XL_POOLED that is not square
# (so its orientation shows), wider than CLIP (diffusers' single-file loader tells the two encoders
# of a file apart by width).
BIG_G = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_hidden_layers=3,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=XL_POOLED,
)
# SDXL's VAE config: its scaling, decoded in fp32
VAE_XL = dict(VAE, scaling_factor=0.13025, force_upcast=True)
# SD v1.5's scheduler_config.json, the fields DDIMScheduler reads.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def byte_chars():
    """GPT-2/CLIP's reversible byte -> printable unicode table (256 entries)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder):
    """A character-level CLIP BPE tokenizer (no merges): 514 tokens, every prompt encodable."""
    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")

    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    return tok


def text_encoder(tokenizer, seed=0, config=CLIP, cls=None):
    """A tiny random transformers CLIPTextModel (or `cls`, e.g. CLIPTextModelWithProjection)
    matching `tokenizer`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return (cls or CLIPTextModel)(cfg).eval()


def randomize(module, seed=0, scale=0.1):
    """Give every parameter random values (diffusers zero-inits some convs, hiding bugs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def pipeline(
    seed=0, unet_config=UNET_V1, folder=None, text=CLIP, pad_token=None, prediction_type="epsilon"
):
    """A tiny random diffusers StableDiffusionPipeline with SD v1.5's DDIM scheduler (for
    `prediction_type`), its tokenizer padding with `pad_token` (default: its end token);
    saved as a diffusers folder (model_index.json, unet/, vae/, ...) when `folder` is given."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tok = write_tokenizer(tempfile.mkdtemp())
    tok.pad_token = pad_token or tok.pad_token
    unet = randomize(UNet2DConditionModel(**unet_config), seed).eval()
    vae = randomize(AutoencoderKL(**VAE), seed + 1).eval()
    scheduler = DDIMScheduler(**dict(SCHEDULER, prediction_type=prediction_type))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder(tok, seed + 2, text),
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def xl_pipeline(seed=0, folder=None, unet_config=UNET_XL):
    """A tiny random diffusers StableDiffusionXLPipeline (`unet_config`, VAE_XL, CLIP and BIG_G
    text encoders, tokenizer_2 padding with "!" as SDXL's, zeros for an empty negative prompt as
    the base model's, no watermark) with SD v1.5's DDIM scheduler (SDXL's betas); saved as a
    diffusers folder when `folder` is given."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModelWithProjection

    tok = write_tokenizer(tempfile.mkdtemp())
    tok_2 = write_tokenizer(tempfile.mkdtemp())
    tok_2.pad_token = "!"
    pipe = StableDiffusionXLPipeline(
        vae=randomize(AutoencoderKL(**VAE_XL), seed + 1).eval(),
        text_encoder=text_encoder(tok, seed + 2),
        text_encoder_2=text_encoder(tok_2, seed + 3, BIG_G, CLIPTextModelWithProjection),
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=randomize(UNet2DConditionModel(**unet_config), seed).eval(),
        scheduler=DDIMScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe
