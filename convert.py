"""convert.py: official checkpoint names <-> ours (= diffusers'), pure functions.

LDM, sgm (SDXL) and OpenCLIP names by a short rule table plus one index function (the UNet's
numbered blocks); the layouts that differ (VAE attention as 1x1 convs, OpenCLIP's fused q, k, v
and its x @ P projection); the tensors a file carries that no model holds (schedule buffers,
OpenCLIP's unused head). Configs: configs.py. LDM names as in
CompVis/stable-diffusion@21f890f9da3c ldm/modules/diffusionmodules/openaimodel.py
and SDXL's conditioner (embedders 0 and 1) as in
Stability-AI/generative-models@31fe459a8568 sgm/modules/encoders/modules.py
"""

import functools
import re

import torch

import sampler
from unet import UNetConfig
from vae import VAEConfig

OPENCLIP = "cond_stage_model.model."  # SD 2.x's text encoder, OpenCLIP ViT-H/14's text tower
# SDXL's first text encoder, CLIP ViT-L/14 (transformers-4 names)
XL_CLIP = "conditioner.embedders.0.transformer."
# SDXL's second, OpenCLIP ViT-bigG/14's text tower with its projection
XL_OPENCLIP = "conditioner.embedders.1.model."
TEXT_PARTS = {
    "sd1": ("text_encoder",),
    "sd2": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
}
# the part that is OpenCLIP's, per family
OPENCLIP_PART = {"sd2": "text_encoder", "sdxl": "text_encoder_2"}
# Known non-model tensors of LDM files: the 12 DDPM schedule buffers (betas, *alphas_cumprod*,
# posterior_*; sampler.py recomputes them), logvar, EMA copies (model_ema.*: like diffusers, we load
# model.*), position ids; sgm's denoiser.sigmas (the same schedule, in files saved from sgm's whole
# DiffusionEngine).
IGNORED = re.compile(
    r"betas|\w*alphas_cumprod\w*|posterior_\w+|logvar|model_ema\..+|.+\.position_ids"
    r"|denoiser\.sigmas"
)
# 1x1 convs in LDM
VAE_ATTN_WEIGHT = re.compile(r"vae\..*\.attentions\.0\.(to_[qkv]|to_out\.0)\.weight")
# OpenCLIP's q, k, v in one
IN_PROJ = re.compile(r"(text_encoder(?:_2)?\..+\.self_attn\.)in_proj\.(weight|bias)")
# OpenCLIP's P multiplies from the right: x @ P = Linear(P.T)
TEXT_PROJECTION = "text_encoder_2.text_projection.weight"


def _rules(pairs):
    """(LDM, ours) name patterns, '#' an index and '*' any text, compiled both ways:
    (forward, back)."""

    def compile_(src, dst):
        groups = iter(range(1, 10))
        regex = "^" + re.escape(src).replace(r"\*", "(.*?)").replace(r"\#", r"(\d+)")
        return re.compile(regex), re.sub(r"[*#]", lambda _: rf"\g<{next(groups)}>", dst)

    return [compile_(a, b) for a, b in pairs], [compile_(b, a) for a, b in reversed(pairs)]


PREFIXES, PREFIXES_BACK = _rules(
    [("model.diffusion_model.", "unet."), ("first_stage_model.", "vae.")]
)


def _openclip(prefix, to):
    """OpenCLIP's TextTransformer (open_clip/model.py, transformer.py ResidualAttentionBlock) at
    `prefix` onto transformers' CLIP text model at `to` (split_in_proj splits its q, k, v)."""
    return [
        (prefix + "transformer.resblocks.", to + "encoder.layers."),
        (prefix + "token_embedding.", to + "embeddings.token_embedding."),
        (prefix + "positional_embedding", to + "embeddings.position_embedding.weight"),
        (prefix + "ln_final.", to + "final_layer_norm."),
        (to + "*.ln_1.", to + "*.layer_norm1."),
        (to + "*.ln_2.", to + "*.layer_norm2."),
        (to + "*.mlp.c_fc.", to + "*.mlp.fc1."),
        (to + "*.mlp.c_proj.", to + "*.mlp.fc2."),
        (to + "*.attn.out_proj.", to + "*.self_attn.out_proj."),
        (to + "*.attn.in_proj_", to + "*.self_attn.in_proj."),
    ]


# The text encoders' names per family, onto transformers' CLIPTextModel (SDXL's second:
# CLIPTextModelWithProjection, which keeps the text_model level). transformers 5 dropped
# CLIPTextModel's text_model level: both spellings are read.
TEXT_RULES = {
    "sd1": _rules(
        [
            ("cond_stage_model.transformer.", "text_encoder."),
            ("text_encoder.text_model.", "text_encoder."),
        ]
    ),
    "sd2": _rules(_openclip(OPENCLIP, "text_encoder.")),
    "sdxl": _rules(
        [
            (XL_CLIP, "text_encoder."),
            ("text_encoder.text_model.", "text_encoder."),
            (XL_OPENCLIP + "text_projection", TEXT_PROJECTION),
            *_openclip(XL_OPENCLIP, "text_encoder_2.text_model."),
        ]
    ),
}
RENAMES, RENAMES_BACK = _rules(
    [
        ("unet.time_embed.0.", "unet.time_embedding.linear_1."),
        ("unet.time_embed.2.", "unet.time_embedding.linear_2."),
        ("unet.label_emb.0.0.", "unet.add_embedding.linear_1."),
        ("unet.label_emb.0.2.", "unet.add_embedding.linear_2."),
        ("unet.out.0.", "unet.conv_norm_out."),
        ("unet.out.2.", "unet.conv_out."),
        ("unet.*resnets.#.in_layers.0.", "unet.*resnets.#.norm1."),
        ("unet.*resnets.#.in_layers.2.", "unet.*resnets.#.conv1."),
        ("unet.*resnets.#.emb_layers.1.", "unet.*resnets.#.time_emb_proj."),
        ("unet.*resnets.#.out_layers.0.", "unet.*resnets.#.norm2."),
        ("unet.*resnets.#.out_layers.3.", "unet.*resnets.#.conv2."),
        ("unet.*resnets.#.skip_connection.", "unet.*resnets.#.conv_shortcut."),
        ("unet.*downsamplers.0.op.", "unet.*downsamplers.0.conv."),
        ("vae.encoder.down.#.", "vae.encoder.down_blocks.#."),
        ("vae.*_blocks.#.block.", "vae.*_blocks.#.resnets."),
        ("vae.*_blocks.#.downsample.", "vae.*_blocks.#.downsamplers.0."),
        ("vae.*_blocks.#.upsample.", "vae.*_blocks.#.upsamplers.0."),
        ("vae.*mid.block_1.", "vae.*mid_block.resnets.0."),
        ("vae.*mid.block_2.", "vae.*mid_block.resnets.1."),
        ("vae.*mid.attn_1.norm.", "vae.*mid_block.attentions.0.group_norm."),
        ("vae.*mid.attn_1.q.", "vae.*mid_block.attentions.0.to_q."),
        ("vae.*mid.attn_1.k.", "vae.*mid_block.attentions.0.to_k."),
        ("vae.*mid.attn_1.v.", "vae.*mid_block.attentions.0.to_v."),
        ("vae.*mid.attn_1.proj_out.", "vae.*mid_block.attentions.0.to_out.0."),
        ("vae.*nin_shortcut.", "vae.*conv_shortcut."),
        ("vae.*norm_out.", "vae.*conv_norm_out."),
    ]
)


@functools.lru_cache
def _blocks(n, up_attention, vae_levels):
    """The index function, as rules: LDM's UNet numbers n = layers_per_block + 1 blocks per level,
    each (resnet, transformer); up_attention[i]: up level i has transformers. LDM's VAE decoder
    lists levels reversed."""
    pairs = [
        ("input_blocks.0.0.", "conv_in."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    for i, attention in enumerate(up_attention):
        for j in range(n):
            down = n * i + j + 1  # input block
            up = n * i + j  # output block
            if j < n - 1:
                pairs.append((f"input_blocks.{down}.0.", f"down_blocks.{i}.resnets.{j}."))
                pairs.append((f"input_blocks.{down}.1.", f"down_blocks.{i}.attentions.{j}."))
            pairs.append((f"output_blocks.{up}.0.", f"up_blocks.{i}.resnets.{j}."))
            if attention:
                pairs.append((f"output_blocks.{up}.1.", f"up_blocks.{i}.attentions.{j}."))

        # resamplers: a level's last input block; the last child of its last output block
        if i < len(up_attention) - 1:
            last_up = f"output_blocks.{n * i + n - 1}.{1 + attention}."
            pairs.append((f"input_blocks.{n * (i + 1)}.0.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((last_up, f"up_blocks.{i}.upsamplers.0."))

    unet = [(f"unet.{a}", f"unet.{b}") for a, b in pairs]
    vae = [
        (f"vae.decoder.up.{i}.", f"vae.decoder.up_blocks.{vae_levels - 1 - i}.")
        for i in range(vae_levels)
    ]
    return _rules(unet + vae)


def _rename(key, unet, vae, back, family):
    """Prefixes, block indices (the configs' layout, default SD v1's), then leaf names; or
    all of them back."""
    unet = unet or UNetConfig.sd1()
    vae = vae or VAEConfig.sd()
    attention = tuple("CrossAttn" in kind for kind in unet.up_block_types)
    blocks = _blocks(unet.layers_per_block + 1, attention, len(vae.block_out_channels))[back]
    text = TEXT_RULES[family][back]

    rules = PREFIXES + text + blocks + RENAMES
    if back:
        rules = RENAMES_BACK + blocks + text + PREFIXES_BACK
    for regex, template in rules:
        key = regex.sub(template, key, count=1)
    return key


def ldm_to_ours(key, unet=None, vae=None, family="sd1"):
    """Our name (unet./vae./text_encoder. + the module's key) of an LDM checkpoint key."""
    return _rename(key, unet, vae, False, family)


def ours_to_ldm(key, unet=None, vae=None, family="sd1"):
    """The official LDM name of one of ours (the inverse of ldm_to_ours)."""
    return _rename(key, unet, vae, True, family)


def _layout(name, t, back):
    """One tensor under our name from LDM's layout to ours, or back."""
    # LDM's 1x1 conv [C, C, 1, 1], our linear [C, C]
    if VAE_ATTN_WEIGHT.fullmatch(name):
        return t[:, :, None, None] if back else t.flatten(1)
    # P and P.T: both ways the same
    if name == TEXT_PROJECTION:
        return t.t().contiguous()
    return t


def to_ours(name, t):
    """{our name: tensor} of one LDM tensor under our name, in our layout: a VAE attention 1x1
    conv as a linear weight, OpenCLIP's projection P as the Linear weight P.T, its fused q, k, v
    apart (split_in_proj)."""
    return split_in_proj(name, _layout(name, t, back=False))


def to_ldm(tensors, family):
    """The inverse, on a state dict under our names: {our name: tensor in the LDM layout} (q, k, v
    fused again)."""
    fused = tensors
    if family in OPENCLIP_PART:
        fused = fuse_in_proj(tensors, OPENCLIP_PART[family])
    return {name: _layout(name, t, back=True) for name, t in fused.items()}


def split_in_proj(name, t):
    """{our name: tensor} for one tensor under our name: OpenCLIP's fused attention input
    projection (torch's MultiheadAttention in_proj, [3 D, ...]: q, k, v rows) as transformers'
    q_proj, k_proj, v_proj; others as they are."""
    fused = IN_PROJ.fullmatch(name)
    if not fused:
        return {name: t}
    return {f"{fused[1]}{p}_proj.{fused[2]}": x.clone() for p, x in zip("qkv", t.chunk(3))}


def fuse_in_proj(tensors, part="text_encoder"):
    """The inverse, on a state dict under our names: each layer's q, k, v projections of text
    encoder `part` as one in_proj."""
    pattern = re.escape(part) + r"(\..+\.self_attn\.)([qkv])_proj\.(weight|bias)"
    out = {}
    for name, t in tensors.items():
        qkv = re.fullmatch(pattern, name)
        if not qkv:
            out[name] = t
        elif qkv[2] == "q":
            # with its k and v
            layer, kind = qkv[1], qkv[3]
            projections = [tensors[f"{part}{layer}{p}_proj.{kind}"] for p in "qkv"]
            out[f"{part}{layer}in_proj.{kind}"] = torch.cat(projections)
    return out


def unused(key, text):
    """Whether an LDM key is a known tensor the model does not use.

    SD 2.x conditions on the penultimate block of OpenCLIP's text tower
    (FrozenOpenCLIPEmbedder(layer="penultimate")), so a file with the whole tower has a last block
    past `text`'s (the CLIPTextConfig's) layers, and the tower's contrastive head (text_projection,
    logit_scale). SDXL uses its tower whole, the projection included (the pooled embedding), but
    for the contrastive logit_scale."""
    if key == XL_OPENCLIP + "logit_scale":
        return True
    pattern = r"(text_projection|logit_scale|transformer\.resblocks\.(\d+)\..+)"
    head = re.fullmatch(re.escape(OPENCLIP) + pattern, key)
    return bool(head) and (head[2] is None or int(head[2]) == text.num_hidden_layers)


def schedule_buffers():
    """The 12 DDPM buffers an official LDM file stores (ldm/models/diffusion/ddpm.py
    register_schedule: computed in float64, stored as float32) for SD's schedule; loading ignores
    them (IGNORED)."""
    betas = sampler.betas(torch.float64)
    a = torch.cumprod(1 - betas, 0)  # alpha_bar_t
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    # of the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7
    variance = betas * (1 - a_prev) / (1 - a)
    buffers = dict(
        betas=betas,
        alphas_cumprod=a,
        alphas_cumprod_prev=a_prev,
        sqrt_alphas_cumprod=a.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - a).sqrt(),
        log_one_minus_alphas_cumprod=(1 - a).log(),
        sqrt_recip_alphas_cumprod=(1 / a).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / a - 1).sqrt(),
        posterior_variance=variance,
        posterior_log_variance_clipped=variance.clamp(min=1e-20).log(),
        posterior_mean_coef1=betas * a_prev.sqrt() / (1 - a),
        posterior_mean_coef2=(1 - a_prev) * (1 - betas).sqrt() / (1 - a),
    )
    return {name: buffer.float() for name, buffer in buffers.items()}
