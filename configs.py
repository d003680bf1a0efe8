"""configs.py: the model configs of a checkpoint, pure functions.

A checkpoint's family (SD v1, 2.x, XL); its configs from an official LDM file's tensor shapes plus
what shapes cannot tell, the family's constants (SD v1's 8 heads, 64-dim heads of SD 2.x and
SDXL, CLIP's 64-dim text heads and activations, the prediction type and image size where a
file's metadata is silent); from and to diffusers' config.json files. LDM configs as in
Stability-AI/stablediffusion@cf1d67a6fd5e configs/stable-diffusion/v2-inference-v.yaml
"""

import dataclasses
import functools
import re

from transformers import CLIPTextConfig

import sampler
from convert import OPENCLIP, OPENCLIP_PART, TEXT_PARTS, TEXT_PROJECTION, XL_OPENCLIP, ldm_to_ours
from unet import CROSS_DOWN, CROSS_UP, RESNET_EPS, SIZE_NUMBERS, UNetConfig
from vae import VAEConfig

CLIP_HEAD_DIM = 64  # CLIP text heads are 64 wide (ViT-L/14: 768 = 12 x 64)
# SD 2.x and SDXL UNet heads: num_head_channels 64 (v2-inference-v.yaml, sd_xl_base.yaml)
UNET_HEAD_DIM = 64
CLIP_ACT = "quick_gelu"  # OpenAI CLIP's activation, x * sigmoid(1.702 x)
OPENCLIP_ACT = "gelu"  # OpenCLIP ViT-H's and bigG's activation: nn.GELU (erf), transformers' "gelu"

# A single file's family by its text encoder's names; a folder's by its UNet: SDXL's added
# embedding, else the context width of CLIP ViT-L/14 (v1) or OpenCLIP ViT-H (v2), else linear
# projections, SD v2's hallmark (tests' widths).
TEXT_PREFIX = {"sdxl": XL_OPENCLIP, "sd2": OPENCLIP, "sd1": "cond_stage_model.transformer."}
FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2"}

# Where a single file's metadata is silent (the official files' is): SD v1 and the SD 2.x "base"
# files are epsilon models of 512 px, other SD 2.x files (v2-1_768-ema-pruned) v-models of 768 px,
# as diffusers takes them; SDXL base is an epsilon model of 1024 px.
SD1_SIZE = 512
SD2_V_SIZE = 768
SDXL_SIZE = 1024
# safetensors metadata "WxH" (Stability's model spec), e.g. "1024x1024"
RESOLUTION = "modelspec.resolution"
PREDICTION = "modelspec.prediction_type"  # the same spec's "epsilon" or "v"
# the spec's prediction types -> PREDICTIONS
SPEC_PREDICTIONS = {
    "epsilon": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
}
# The spec's other fields a file must carry (A1111 and ComfyUI read them): its version, the
# model's architecture (a LoRA's with "/lora" after it) and the code that defines the model
SPEC_VERSION = "1.0.0"
ARCHITECTURES = {
    ("sd1", "epsilon"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512",
    ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
}
IMPLEMENTATIONS = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}


def _shape(sd, key):
    return tuple(sd[key].shape)


def _numbers(sd, pattern):
    """The distinct block numbers `pattern` captures in the keys of sd."""
    return sorted({int(m[1]) for k in sd if (m := re.match(pattern, k))})


def file_family(sd):
    """ "sd1", "sd2" or "sdxl" of an LDM state dict by its text encoder's names, else None."""
    for family, prefix in TEXT_PREFIX.items():
        if any(k.startswith(prefix) for k in sd):
            return family
    return None


def folder_family(unet):
    """ "sd1", "sd2" or "sdxl" of a diffusers folder by its UNetConfig."""
    if unet.addition_embed_type:
        return "sdxl"
    by_projection = "sd2" if unet.use_linear_projection else "sd1"
    return FAMILY_BY_CONTEXT.get(unet.cross_attention_dim, by_projection)


def stated(metadata, family, prediction_type=None):
    """A single file's prediction type and image side: `prediction_type`, else what its model-spec
    metadata states ("v", "512x512"), else the family's (see SD1_SIZE); an SD 2.x epsilon model
    is a 512 px base model."""
    default = "v_prediction" if family == "sd2" else "epsilon"
    prediction = prediction_type or SPEC_PREDICTIONS.get(metadata.get(PREDICTION), default)

    size = re.fullmatch(r"(\d+)x\d+", metadata.get(RESOLUTION, ""))
    if size:
        return prediction, int(size[1])
    sizes = {"sdxl": SDXL_SIZE, "sd2": SD2_V_SIZE if prediction == "v_prediction" else SD1_SIZE}
    return prediction, sizes.get(family, SD1_SIZE)


def model_spec(family, prediction_type, size, title, adapter=None):
    """The model-spec metadata of a file of a `family` model ("lora" for `adapter`: a LoRA of
    it): {"modelspec.sai_model_spec": ..., "modelspec.architecture": ..., ...}."""
    architecture = ARCHITECTURES.get((family, prediction_type), f"stable-diffusion-{family}")
    if adapter:
        architecture += f"/{adapter}"
    return {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": title,
        RESOLUTION: f"{size}x{size}",
        PREDICTION: prediction_type.removesuffix("_prediction"),
    }


def size_embedding_width(inputs, pooled):
    """d, the sinusoidal width of each of SDXL's size numbers, from the added embedding's input
    width `inputs` = pooled + SIZE_NUMBERS x d and the pooled text's width; ValueError when no even
    d > 0 explains `inputs` (unet.timestep_embedding needs an even width)."""
    d, rest = divmod(inputs - pooled, SIZE_NUMBERS)
    if rest or d <= 0 or d % 2:
        raise ValueError(
            f"SDXL's added embedding (label_emb.0.0) takes {inputs} inputs, not the pooled "
            f"text's {pooled} plus {SIZE_NUMBERS} size embeddings of one even width"
        )
    return d


def check_added_embedding(unet, pooled):
    """ValueError unless an SDXL UNetConfig's added embedding (a diffusers folder states its
    widths) takes the pooled text's `pooled` inputs plus SIZE_NUMBERS of addition_time_embed_dim."""
    inputs = unet.projection_class_embeddings_input_dim
    if size_embedding_width(inputs, pooled) != unet.addition_time_embed_dim:
        raise ValueError(
            f"SDXL's added embedding takes {inputs} inputs, not the pooled text's {pooled} plus "
            f"{SIZE_NUMBERS} x addition_time_embed_dim {unet.addition_time_embed_dim}"
        )


def unet_config(sd):
    """UNetConfig of an LDM state dict's model.diffusion_model.* (SD v1, 2.x, XL) from its shapes,
    else the family's: SD v1's 8 heads for 1x1-conv projections, else 64-dim heads. With label_emb
    (SDXL's added embedding) the size numbers' width d comes from its input width and the pooled
    text's (size_embedding_width)."""
    shape = functools.partial(_shape, sd)
    numbers = functools.partial(_numbers, sd)
    u = "model.diffusion_model."
    label = "model.diffusion_model.label_emb.0.0.weight"

    # downsamplers: input_blocks.{n (i + 1)}
    ops = numbers(re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.")
    n = ops[0]
    levels = len(ops) + 1

    # which levels have transformers, going down and going up
    attention = [
        [f"{u}{blocks}.{n * i + first}.1.proj_in.weight" in sd for i in range(levels)]
        for blocks, first in (("input_blocks", 1), ("output_blocks", 0))
    ]
    # 1 where a level has no attention, as diffusers' configs write it
    depth = [
        len(numbers(rf"{re.escape(u)}input_blocks\.{n * i + 1}\.1\.transformer_blocks\.(\d+)\."))
        or 1
        for i in range(levels)
    ]
    widths = tuple(
        shape(f"{u}input_blocks.{n * i + 1}.0.in_layers.2.weight")[0] for i in range(levels)
    )
    linear = len(shape(f"{u}middle_block.1.proj_in.weight")) == 2

    # label_emb: SDXL's added embedding, on [pooled text, the size numbers' embeddings]
    family = UNetConfig.sdxl() if label in sd else UNetConfig.sd1()
    added_inputs = None
    size_width = None
    if label in sd:
        added_inputs = shape(label)[1]
        pooled = shape(XL_OPENCLIP + "text_projection")[1]  # open_clip's P: [width, pooled]
        size_width = size_embedding_width(added_inputs, pooled)

    heads = tuple(w // UNET_HEAD_DIM for w in widths) if linear else family.attention_head_dim
    return dataclasses.replace(
        family,
        in_channels=shape(f"{u}input_blocks.0.0.weight")[1],
        out_channels=shape(f"{u}out.2.weight")[0],
        block_out_channels=widths,
        layers_per_block=n - 1,
        use_linear_projection=linear,
        down_block_types=tuple(CROSS_DOWN if a else "DownBlock2D" for a in attention[0]),
        up_block_types=tuple(CROSS_UP if a else "UpBlock2D" for a in attention[1]),
        cross_attention_dim=shape(f"{u}middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        attention_head_dim=heads,
        # one value where all levels agree: as configs say
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else tuple(depth),
        addition_time_embed_dim=size_width,
        projection_class_embeddings_input_dim=added_inputs,
    )


def infer_configs(sd, family="sd1"):
    """UNet (unet_config), VAE and CLIP text configs (SDXL: two) of an LDM SD v1, 2.x or XL state
    dict from its shapes; what shapes cannot tell (32 groups, the VAE's scaling, sample sizes,
    64-wide CLIP heads, activations) is the family's."""
    shape = functools.partial(_shape, sd)
    numbers = functools.partial(_numbers, sd)
    v = "first_stage_model."
    unet = unet_config(sd)

    levels = numbers(re.escape(v) + r"encoder\.down\.(\d+)\.")
    vae = dataclasses.replace(
        VAEConfig.sdxl() if family == "sdxl" else VAEConfig.sd(),
        in_channels=shape(f"{v}encoder.conv_in.weight")[1],
        out_channels=shape(f"{v}decoder.conv_out.weight")[0],
        latent_channels=shape(f"{v}post_quant_conv.weight")[0],
        block_out_channels=tuple(
            shape(f"{v}encoder.down.{i}.block.0.conv2.weight")[0] for i in levels
        ),
        layers_per_block=len(numbers(re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")),
    )

    # The text encoders' shapes under transformers' names (OpenCLIP's q, k, v still fused)
    texts = {
        ldm_to_ours(k, family=family): x
        for k, x in sd.items()
        if k.startswith(("cond_stage_model.", "conditioner."))
    }
    text_configs = [_text_config(texts, part, family, sd) for part in TEXT_PARTS[family]]
    return unet, vae, *text_configs


def _text_config(t, part, family, sd):
    """The CLIPTextConfig of text encoder `part` from its tensors `t` under our names. A SD 2.x
    file holding OpenCLIP's whole text tower (text_projection tells) has a last block SD 2.x does
    not use; SDXL's tower is used whole."""
    # CLIPTextModelWithProjection keeps the text_model level
    p = f"{part}.text_model." if part == "text_encoder_2" else f"{part}."
    vocab, width = _shape(t, p + "embeddings.token_embedding.weight")
    layers = len(_numbers(t, re.escape(p) + r"encoder\.layers\.(\d+)\."))
    unused_last = family == "sd2" and f"{OPENCLIP}text_projection" in sd

    projection = {}
    if part == "text_encoder_2":
        projection = {"projection_dim": _shape(t, TEXT_PROJECTION)[1]}  # P: [width, dim]

    # the special token ids are the tokenizer's, set by load_sd.load()
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=_shape(t, p + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers - unused_last,
        num_attention_heads=width // CLIP_HEAD_DIM,
        hidden_act=OPENCLIP_ACT if OPENCLIP_PART.get(family) == part else CLIP_ACT,
        max_position_embeddings=_shape(t, p + "embeddings.position_embedding.weight")[0],
        **projection,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


# diffusers config.json options -> SD's value (a tuple: any of these); unlisted options must be
# off (None).
SD_VALUES = {
    UNetConfig: dict(
        # the input and the time embedding
        center_input_sample=False,
        conv_in_kernel=3,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        # the resnets
        act_fn="silu",
        dropout=0.0,
        norm_eps=RESNET_EPS,
        resnet_skip_time_act=False,
        resnet_time_scale_shift="default",
        resnet_out_scale_factor=1.0,
        # the blocks and the output
        down_block_types=(CROSS_DOWN, "DownBlock2D"),
        up_block_types=(CROSS_UP, "UpBlock2D"),
        downsample_padding=1,
        mid_block_type="UNetMidBlock2DCrossAttn",
        mid_block_scale_factor=1,
        conv_out_kernel=3,
        # the attention; upcast_attention: an fp32 softmax in diffusers' non-SDPA attention, which
        # SDPA ignores
        attention_type="default",
        only_cross_attention=False,
        dual_cross_attention=False,
        upcast_attention=(False, True, None),
        # the class and added embeddings: SDXL's "text_time" or none
        class_embeddings_concat=False,
        addition_embed_type=(None, "text_time"),
        addition_embed_type_num_heads=64,
    ),
    VAEConfig: dict(
        down_block_types="DownEncoderBlock2D",
        up_block_types="UpDecoderBlock2D",
        act_fn="silu",
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        force_upcast=(False, True),  # a pipeline hint: decode fp16 latents in fp32
    ),
}


def config_from_json(cls, d):
    """UNetConfig or VAEConfig from a diffusers config.json dict (lists as tuples); ValueError on
    non-SD options."""
    names = {f.name for f in dataclasses.fields(cls)}
    sd_values = SD_VALUES[cls]
    for key, value in d.items():
        # "_class_name", "_diffusers_version": bookkeeping; and the fields we build from
        if key.startswith("_") or key in names and key not in sd_values:
            continue
        allowed = sd_values.get(key, None)
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        # per-level lists: each entry
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v not in allowed for v in values):
            raise ValueError(
                f"unsupported {cls.__name__} option {key}={value!r}: not Stable Diffusion's"
            )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


# SD v1.5's scheduler/scheduler_config.json: the DDIM that sampler.py implements.
DDIM_SCHEDULER = dict(
    _class_name="DDIMScheduler",
    num_train_timesteps=sampler.NUM_TRAIN_TIMESTEPS,
    beta_start=sampler.BETA_START,
    beta_end=sampler.BETA_END,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def diffusers_configs(unet, vae, prediction_type, family="sd1"):
    """{file name: dict} of the config files a diffusers StableDiffusionPipeline folder holds
    (SDXL's StableDiffusionXLPipeline: a second text encoder and tokenizer), for our configs."""
    levels = len(vae.block_out_channels)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "requires_safety_checker": False,
        "safety_checker": [None, None],
    }
    # as the base model's model_index.json: the empty prompt's embeddings are zeros (text.py)
    if family == "sdxl":
        index = {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "image_encoder": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    return {
        "unet/config.json": dict(dataclasses.asdict(unet), _class_name="UNet2DConditionModel"),
        "vae/config.json": dict(
            dataclasses.asdict(vae),
            _class_name="AutoencoderKL",
            down_block_types=["DownEncoderBlock2D"] * levels,
            up_block_types=["UpDecoderBlock2D"] * levels,
        ),
        "scheduler/scheduler_config.json": dict(DDIM_SCHEDULER, prediction_type=prediction_type),
        "model_index.json": {
            **index,
            "feature_extractor": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
    }
