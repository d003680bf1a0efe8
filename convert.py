"""convert.py: official checkpoint names and shapes <-> ours (= diffusers'), pure functions: LDM and OpenCLIP names
by a short rule table plus one index function (the UNet's numbered blocks); configs from tensor shapes plus the
family's constants (SD v1, 2.x; SDXL's UNet), or from diffusers' config.json; LDM's schedule buffers. LDM names as in
https://github.com/CompVis/stable-diffusion/blob/21f890f9da3cfbeaba8e2ac3c425ee9e998d5229/ldm/modules/diffusionmodules/openaimodel.py"""
import dataclasses
import functools
import re

import torch
from transformers import CLIPTextConfig

import sampler
from unet import CROSS_DOWN, CROSS_UP, RESNET_EPS, UNetConfig
from vae import VAEConfig

CLIP_MAX_LEN = 77  # CLIP's context length: prompts are padded/truncated to 77 tokens
CLIP_HEAD_DIM = 64  # CLIP text heads are 64 wide (ViT-L/14: 768 = 12 x 64)
UNET_HEAD_DIM = 64  # SD 2.x and SDXL UNet heads: num_head_channels 64 (v2-inference-v.yaml, sd_xl_base.yaml)
CLIP_ACT = "quick_gelu"  # OpenAI CLIP's activation, x * sigmoid(1.702 x)
OPENCLIP = "cond_stage_model.model."  # SD 2.x's text encoder, OpenCLIP ViT-H/14's text tower
OPENCLIP_ACT = "gelu"  # OpenCLIP ViT-H's activation: nn.GELU (erf), transformers' "gelu"
# Known non-model tensors of LDM files: the 12 DDPM schedule buffers (betas, *alphas_cumprod*, posterior_*;
# sampler.py recomputes them), logvar, EMA copies (model_ema.*: like diffusers, we load model.*), position ids.
IGNORED = re.compile(r"betas|\w*alphas_cumprod\w*|posterior_\w+|logvar|model_ema\..+|.+\.position_ids")
VAE_ATTN_WEIGHT = re.compile(r"vae\..*\.attentions\.0\.(to_[qkv]|to_out\.0)\.weight")  # 1x1 convs in LDM
IN_PROJ = re.compile(r"(text_encoder\..+\.self_attn\.)in_proj\.(weight|bias)")  # OpenCLIP's q, k, v in one


def _rules(pairs):
    """(LDM, ours) name patterns, '#' an index and '*' any text, compiled both ways: (forward, back)."""
    def compile_(src, dst):
        groups = iter(range(1, 10))
        regex = "^" + re.escape(src).replace(r"\*", "(.*?)").replace(r"\#", r"(\d+)")
        return re.compile(regex), re.sub(r"[*#]", lambda _: rf"\g<{next(groups)}>", dst)
    return [compile_(a, b) for a, b in pairs], [compile_(b, a) for a, b in reversed(pairs)]


PREFIXES, PREFIXES_BACK = _rules([("model.diffusion_model.", "unet."), ("first_stage_model.", "vae.")])
# The text encoder's names per family, onto transformers' CLIPTextModel (split_in_proj splits OpenCLIP's q, k, v).
TEXT_RULES = {
    "sd1": _rules([("cond_stage_model.transformer.", "text_encoder."),
                   ("text_encoder.text_model.", "text_encoder.")]),  # transformers 5 dropped this level: both are read
    "sd2": _rules([  # OpenCLIP's TextTransformer (open_clip/model.py, transformer.py ResidualAttentionBlock)
        (OPENCLIP + "transformer.resblocks.", "text_encoder.encoder.layers."),
        (OPENCLIP + "token_embedding.", "text_encoder.embeddings.token_embedding."),
        (OPENCLIP + "positional_embedding", "text_encoder.embeddings.position_embedding.weight"),
        (OPENCLIP + "ln_final.", "text_encoder.final_layer_norm."),
        ("text_encoder.*.ln_1.", "text_encoder.*.layer_norm1."), ("text_encoder.*.ln_2.", "text_encoder.*.layer_norm2."),
        ("text_encoder.*.mlp.c_fc.", "text_encoder.*.mlp.fc1."), ("text_encoder.*.mlp.c_proj.", "text_encoder.*.mlp.fc2."),
        ("text_encoder.*.attn.out_proj.", "text_encoder.*.self_attn.out_proj."),
        ("text_encoder.*.attn.in_proj_", "text_encoder.*.self_attn.in_proj.")]),
}
RENAMES, RENAMES_BACK = _rules([
    ("unet.time_embed.0.", "unet.time_embedding.linear_1."), ("unet.time_embed.2.", "unet.time_embedding.linear_2."),
    ("unet.label_emb.0.0.", "unet.add_embedding.linear_1."), ("unet.label_emb.0.2.", "unet.add_embedding.linear_2."),
    ("unet.out.0.", "unet.conv_norm_out."), ("unet.out.2.", "unet.conv_out."),
    ("unet.*resnets.#.in_layers.0.", "unet.*resnets.#.norm1."), ("unet.*resnets.#.in_layers.2.", "unet.*resnets.#.conv1."),
    ("unet.*resnets.#.emb_layers.1.", "unet.*resnets.#.time_emb_proj."),
    ("unet.*resnets.#.out_layers.0.", "unet.*resnets.#.norm2."), ("unet.*resnets.#.out_layers.3.", "unet.*resnets.#.conv2."),
    ("unet.*resnets.#.skip_connection.", "unet.*resnets.#.conv_shortcut."),
    ("unet.*downsamplers.0.op.", "unet.*downsamplers.0.conv."),
    ("vae.encoder.down.#.", "vae.encoder.down_blocks.#."), ("vae.*_blocks.#.block.", "vae.*_blocks.#.resnets."),
    ("vae.*_blocks.#.downsample.", "vae.*_blocks.#.downsamplers.0."),
    ("vae.*_blocks.#.upsample.", "vae.*_blocks.#.upsamplers.0."),
    ("vae.*mid.block_1.", "vae.*mid_block.resnets.0."), ("vae.*mid.block_2.", "vae.*mid_block.resnets.1."),
    ("vae.*mid.attn_1.norm.", "vae.*mid_block.attentions.0.group_norm."),
    ("vae.*mid.attn_1.q.", "vae.*mid_block.attentions.0.to_q."), ("vae.*mid.attn_1.k.", "vae.*mid_block.attentions.0.to_k."),
    ("vae.*mid.attn_1.v.", "vae.*mid_block.attentions.0.to_v."),
    ("vae.*mid.attn_1.proj_out.", "vae.*mid_block.attentions.0.to_out.0."),
    ("vae.*nin_shortcut.", "vae.*conv_shortcut."), ("vae.*norm_out.", "vae.*conv_norm_out."),
])


@functools.lru_cache
def _blocks(n, up_attention, vae_levels):
    """The index function, as rules: LDM's UNet numbers n = layers_per_block + 1 blocks per level, each
    (resnet, transformer); up_attention[i]: up level i has transformers. LDM's VAE decoder lists levels reversed."""
    pairs = [("input_blocks.0.0.", "conv_in."), ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.1.", "mid_block.attentions.0."), ("middle_block.2.", "mid_block.resnets.1.")]
    for i, attention in enumerate(up_attention):
        for j in range(n):
            if j < n - 1:
                pairs += [(f"input_blocks.{n * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."),
                          (f"input_blocks.{n * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")]
            pairs += [(f"output_blocks.{n * i + j}.0.", f"up_blocks.{i}.resnets.{j}.")]
            pairs += [(f"output_blocks.{n * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")] if attention else []
        if i < len(up_attention) - 1:  # resamplers: a level's last input block; the last child of its last output block
            pairs += [(f"input_blocks.{n * (i + 1)}.0.", f"down_blocks.{i}.downsamplers.0."),
                      (f"output_blocks.{n * i + n - 1}.{1 + attention}.", f"up_blocks.{i}.upsamplers.0.")]
    return _rules([(f"unet.{a}", f"unet.{b}") for a, b in pairs] + [
        (f"vae.decoder.up.{i}.", f"vae.decoder.up_blocks.{vae_levels - 1 - i}.") for i in range(vae_levels)])


def _rename(key, unet, vae, back, family):
    """Prefixes, block indices (the configs' layout, default SD v1's), then leaf names; or all back."""
    unet, vae = unet or UNetConfig.sd1(), vae or VAEConfig.sd()
    attention = tuple("CrossAttn" in kind for kind in unet.up_block_types)
    blocks = _blocks(unet.layers_per_block + 1, attention, len(vae.block_out_channels))[back]
    text = TEXT_RULES[family][back]
    for regex, template in (RENAMES_BACK + blocks + text + PREFIXES_BACK) if back else (PREFIXES + text + blocks + RENAMES):
        key = regex.sub(template, key, count=1)
    return key


def ldm_to_ours(key, unet=None, vae=None, family="sd1"):
    """Our name (unet./vae./text_encoder. + the module's key) of an LDM checkpoint key."""
    return _rename(key, unet, vae, False, family)


def ours_to_ldm(key, unet=None, vae=None, family="sd1"):
    """The official LDM name of one of ours (the inverse of ldm_to_ours)."""
    return _rename(key, unet, vae, True, family)


def split_in_proj(name, t):
    """{our name: tensor} for one tensor under our name: OpenCLIP's fused attention input projection (torch's
    MultiheadAttention in_proj, [3 D, ...]: q, k, v rows) as transformers' q_proj, k_proj, v_proj; others as they are."""
    fused = IN_PROJ.fullmatch(name)
    return {f"{fused[1]}{p}_proj.{fused[2]}": x.clone() for p, x in zip("qkv", t.chunk(3))} if fused else {name: t}


def fuse_in_proj(tensors):
    """The inverse, on a state dict under our names: each text layer's q, k, v projections as one in_proj."""
    out = {}
    for name, t in tensors.items():
        qkv = re.fullmatch(r"(text_encoder\..+\.self_attn\.)([qkv])_proj\.(weight|bias)", name)
        if not qkv:
            out[name] = t
        elif qkv[2] == "q":  # with its k and v
            out[f"{qkv[1]}in_proj.{qkv[3]}"] = torch.cat([tensors[f"{qkv[1]}{p}_proj.{qkv[3]}"] for p in "qkv"])
    return out


def unused(key, text):
    """Whether an LDM key is a known tensor the model does not use: SD 2.x conditions on the penultimate block of
    OpenCLIP's text tower (FrozenOpenCLIPEmbedder(layer="penultimate")), so a file with the whole tower has a last
    block past `text`'s (the CLIPTextConfig's) layers, and the tower's contrastive head (text_projection, logit_scale)."""
    head = re.fullmatch(re.escape(OPENCLIP) + r"(text_projection|logit_scale|transformer\.resblocks\.(\d+)\..+)", key)
    return bool(head) and (head[2] is None or int(head[2]) == text.num_hidden_layers)


def _shape(sd, key):
    return tuple(sd[key].shape)


def _numbers(sd, pattern):  # the distinct block numbers `pattern` captures in the keys of sd
    return sorted({int(m[1]) for k in sd if (m := re.match(pattern, k))})


def unet_config(sd):
    """UNetConfig of an LDM state dict's model.diffusion_model.* (SD v1, 2.x, XL) from its shapes, else the family's:
    SD v1's 8 heads for 1x1-conv projections, else 64-dim heads; with label_emb SDXL's size-number width and size."""
    shape, numbers = functools.partial(_shape, sd), functools.partial(_numbers, sd)
    u, label = "model.diffusion_model.", "model.diffusion_model.label_emb.0.0.weight"
    ops = numbers(re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.")  # downsamplers: input_blocks.{n (i + 1)}
    n, levels = ops[0], len(ops) + 1
    attention = [[f"{u}{blocks}.{n * i + first}.1.proj_in.weight" in sd for i in range(levels)]
                 for blocks, first in (("input_blocks", 1), ("output_blocks", 0))]
    depth = [len(numbers(rf"{re.escape(u)}input_blocks\.{n * i + 1}\.1\.transformer_blocks\.(\d+)\.")) or 1
             for i in range(levels)]  # 1 where a level has no attention, as diffusers' configs write it
    widths = tuple(shape(f"{u}input_blocks.{n * i + 1}.0.in_layers.2.weight")[0] for i in range(levels))
    linear = len(shape(f"{u}middle_block.1.proj_in.weight")) == 2
    family = UNetConfig.sdxl() if label in sd else UNetConfig.sd1()  # label_emb: SDXL's added embedding
    return dataclasses.replace(
        family, in_channels=shape(f"{u}input_blocks.0.0.weight")[1], out_channels=shape(f"{u}out.2.weight")[0],
        block_out_channels=widths, layers_per_block=n - 1, use_linear_projection=linear,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention[0]),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[1]),
        cross_attention_dim=shape(f"{u}middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        attention_head_dim=tuple(w // UNET_HEAD_DIM for w in widths) if linear else family.attention_head_dim,
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else tuple(depth),  # one value: as configs say
        projection_class_embeddings_input_dim=shape(label)[1] if label in sd else None)


def infer_configs(sd, family="sd1"):
    """UNet (unet_config), VAE and CLIP text configs of an LDM SD v1 or 2.x state dict from its shapes; what shapes
    cannot tell (32 groups, scaling 0.18215, sample sizes, 64-wide CLIP heads, the activation) is the family's."""
    shape, numbers = functools.partial(_shape, sd), functools.partial(_numbers, sd)
    v = "first_stage_model."
    unet = unet_config(sd)
    vae = dataclasses.replace(
        VAEConfig.sd(), in_channels=shape(f"{v}encoder.conv_in.weight")[1],
        out_channels=shape(f"{v}decoder.conv_out.weight")[0], latent_channels=shape(f"{v}post_quant_conv.weight")[0],
        block_out_channels=tuple(shape(f"{v}encoder.down.{i}.block.0.conv2.weight")[0]
                                 for i in numbers(re.escape(v) + r"encoder\.down\.(\d+)\.")),
        layers_per_block=len(numbers(re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")))
    # The text encoder's shapes under transformers' names (SD 2.x: q, k, v still fused); a file holding OpenCLIP's
    # whole text tower (text_projection tells) has a last block SD 2.x does not use.
    t = {ldm_to_ours(k, family=family): x.shape for k, x in sd.items() if k.startswith("cond_stage_model.")}
    vocab, width = t["text_encoder.embeddings.token_embedding.weight"]
    layers = len({k.split(".")[3] for k in t if k.startswith("text_encoder.encoder.layers.")})
    text = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=t["text_encoder.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers - (f"{OPENCLIP}text_projection" in sd), num_attention_heads=width // CLIP_HEAD_DIM,
        hidden_act=OPENCLIP_ACT if family == "sd2" else CLIP_ACT,
        max_position_embeddings=t["text_encoder.embeddings.position_embedding.weight"][0],
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # the tokenizer's, set by load()
    return unet, vae, text


def schedule_buffers():
    """The 12 DDPM buffers an official LDM file stores (ldm/models/diffusion/ddpm.py register_schedule:
    computed in float64, stored as float32) for SD's schedule; loading ignores them (IGNORED)."""
    betas = sampler.betas(torch.float64)
    a = torch.cumprod(1 - betas, 0)  # alpha_bar_t
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    variance = betas * (1 - a_prev) / (1 - a)  # of the posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7
    buffers = dict(betas=betas, alphas_cumprod=a, alphas_cumprod_prev=a_prev, sqrt_alphas_cumprod=a.sqrt(),
                   sqrt_one_minus_alphas_cumprod=(1 - a).sqrt(), log_one_minus_alphas_cumprod=(1 - a).log(),
                   sqrt_recip_alphas_cumprod=(1 / a).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / a - 1).sqrt(),
                   posterior_variance=variance, posterior_log_variance_clipped=variance.clamp(min=1e-20).log(),
                   posterior_mean_coef1=betas * a_prev.sqrt() / (1 - a),
                   posterior_mean_coef2=(1 - a_prev) * (1 - betas).sqrt() / (1 - a))
    return {name: buffer.float() for name, buffer in buffers.items()}


# diffusers config.json options -> SD's value (a tuple: any of these); unlisted options must be off (None).
SD_VALUES = {
    UNetConfig: dict(
        center_input_sample=False, flip_sin_to_cos=True, freq_shift=0, act_fn="silu", dropout=0.0, downsample_padding=1,
        mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False, mid_block_scale_factor=1,
        norm_eps=RESNET_EPS, dual_cross_attention=False, resnet_skip_time_act=False,
        resnet_time_scale_shift="default", resnet_out_scale_factor=1.0, time_embedding_type="positional",
        conv_in_kernel=3, conv_out_kernel=3, attention_type="default", class_embeddings_concat=False,
        addition_embed_type_num_heads=64, down_block_types=(CROSS_DOWN, "DownBlock2D"),
        up_block_types=(CROSS_UP, "UpBlock2D"), addition_embed_type=(None, "text_time"),  # SDXL's
        upcast_attention=(False, True, None)),  # an fp32 softmax in diffusers' non-SDPA attention; SDPA ignores it
    VAEConfig: dict(down_block_types="DownEncoderBlock2D", up_block_types="UpDecoderBlock2D", act_fn="silu",
                    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                    force_upcast=(False, True)),  # a pipeline hint: decode fp16 latents in fp32
}


def config_from_json(cls, d):
    """UNetConfig or VAEConfig from a diffusers config.json dict (lists as tuples); ValueError on non-SD options."""
    names, sd_values = {f.name for f in dataclasses.fields(cls)}, SD_VALUES[cls]
    for key, value in d.items():
        if key.startswith("_") or key in names and key not in sd_values:
            continue  # "_class_name", "_diffusers_version": bookkeeping; and the fields we build from
        allowed = sd_values.get(key, None)
        values = value if isinstance(value, (list, tuple)) else [value]  # per-level lists: each entry
        if any(v not in (allowed if isinstance(allowed, tuple) else (allowed,)) for v in values):
            raise ValueError(f"unsupported {cls.__name__} option {key}={value!r}: not Stable Diffusion's")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


# SD v1.5's scheduler/scheduler_config.json: the DDIM that sampler.py implements.
DDIM_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=sampler.NUM_TRAIN_TIMESTEPS,
                      beta_start=sampler.BETA_START, beta_end=sampler.BETA_END, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def diffusers_configs(unet, vae, prediction_type):
    """{file name: dict} of the config files a diffusers StableDiffusionPipeline folder holds, for our configs."""
    levels = len(vae.block_out_channels)
    return {"unet/config.json": dict(dataclasses.asdict(unet), _class_name="UNet2DConditionModel"),
            "vae/config.json": dict(dataclasses.asdict(vae), _class_name="AutoencoderKL",
                                    down_block_types=["DownEncoderBlock2D"] * levels,
                                    up_block_types=["UpDecoderBlock2D"] * levels),
            "scheduler/scheduler_config.json": dict(DDIM_SCHEDULER, prediction_type=prediction_type),
            "model_index.json": {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                                 "safety_checker": [None, None], "feature_extractor": [None, None],
                                 "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
                                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                                 "tokenizer": ["transformers", "CLIPTokenizer"]}}
