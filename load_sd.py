"""load_sd.py: Stable Diffusion checkpoints (SD v1, 2.x, XL) -> a StableDiffusion bundle (our UNet
and VAE, transformers' CLIP text encoders and tokenizers), and back to an official single file or
a diffusers folder.

Sources: official LDM / sgm single files (Rombach et al., arXiv 2112.10752; Podell et al., arXiv
2307.01952; names by convert.py, configs by configs.py), diffusers folders, hub ids."""

import dataclasses
import json
import os
import re

import huggingface_hub
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import convert
import text
from configs import (
    check_added_embedding,
    config_from_json,
    diffusers_configs,
    file_family,
    folder_family,
    infer_configs,
    model_spec,
    stated,
)
from files import LoadError, atomic_write, first_line, read_metadata, read_tensors
from sampler import PREDICTIONS
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FAMILY_NAMES = {"sd1": "SD v1", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Weight file names per part, tried in order (.bin: older repos): diffusers' for models,
# transformers' for CLIP; text_encoder_2 is SDXL's second.
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),
}
MODELS = {
    "unet": UNet,
    "vae": VAE,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}
# a family's models
PARTS = {family: ("unet", "vae", *texts) for family, texts in convert.TEXT_PARTS.items()}
# the CLI's --dtype names
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")


@dataclasses.dataclass
class StableDiffusion:
    """A loaded model: our UNet and VAE, transformers' CLIP text encoder and tokenizer (SDXL: two
    of each)."""

    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    source: str
    image_size: int = 512  # the side it was trained at: sample.py's default
    text_encoder_2: CLIPTextModelWithProjection = None  # SDXL's OpenCLIP bigG, with its projection
    tokenizer_2: CLIPTokenizer = None
    # The UNet's dtype in the file or folder it came from
    source_dtype: torch.dtype = torch.float32
    # The hashes of the prompts said to be too long (text.tokenize)
    warned: set = dataclasses.field(default_factory=set, repr=False)

    def encode_prompts(self, prompts, size=None):
        """Prompts -> their conditioning (text.py; a prompt past 77 tokens is cut, said the first
        time): the text context [B, 77, D]; SDXL: (context, added), the size numbers of a `size`
        (height, width) image, default the model's."""
        if self.family != "sdxl":
            return text.encode(self.tokenizer, self.text_encoder, prompts, self.warned)
        return text.encode_xl(
            (self.tokenizer, self.tokenizer_2),
            (self.text_encoder, self.text_encoder_2),
            prompts,
            size or (self.image_size, self.image_size),
            self.warned,
        )

    @torch.no_grad()
    def decode_latents(self, latents):
        """Sampled (scaled) latents -> images in [-1, 1], decoded in the VAE's dtype (see load:
        SDXL's fp32)."""
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        return self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor)

    def latent_shape(self, height, width):
        return (
            self.vae.config.latent_channels,
            height // self.vae.scale_factor,
            width // self.vae.scale_factor,
        )


def _single_file(path, prediction_type=None):
    """An LDM single file's configs, tensors per part under our names, family, prediction type
    and image size."""
    sd = read_tensors(path)
    family = file_family(sd)

    # none: say the names it has instead, SDXL's conditioner by embedder (the refiner's is
    # embedders.0.model)
    if family is None:
        found = sorted(
            {".".join(k.split(".")[: 3 if k.startswith("conditioner.") else 1]) for k in sd}
        )
        raise LoadError(
            f"{path} is not an SD v1, 2.x or XL base checkpoint (no cond_stage_model.* or "
            f"{convert.XL_OPENCLIP}*): found {', '.join(found[:6])}"
        )

    # the configs from the shapes
    try:
        configs = unet, vae, text, *_ = infer_configs(sd, family)
    except (KeyError, IndexError) as e:
        family_name = FAMILY_NAMES[family]
        raise LoadError(
            f"{path} is an incomplete {family_name} checkpoint: {first_line(e)}"
        ) from None
    except ValueError as e:
        # a shape no rule explains (configs.size_embedding_width)
        raise LoadError(f"{path}: {e}") from None

    # our names, each tensor in a part
    names = {
        k: convert.ldm_to_ours(k, unet, vae, family)
        for k in sd
        if not convert.IGNORED.fullmatch(k) and not convert.unused(k, text)
    }
    parts = {part: {} for part in PARTS[family]}
    leftover = [k for k, name in names.items() if name.partition(".")[0] not in parts]
    if leftover:
        raise LoadError(
            f"{path}: {len(leftover)} tensors of no {FAMILY_NAMES[family]} part, "
            f"e.g. {', '.join(leftover[:3])}"
        )
    for key, name in names.items():
        # our layout: linear VAE attention, q, k, v apart, ...
        for ours, t in convert.to_ours(name, sd[key]).items():
            part, _, rest = ours.partition(".")
            parts[part][rest] = t

    prediction, size = stated(read_metadata(path), family, prediction_type)
    return configs, parts, family, prediction, size


def _folder(folder, variant=None, prediction_type=None):
    """The same for a diffusers folder: configs from its config.json files, weights as they are."""

    def read_json(part, name="config.json"):
        with open(os.path.join(folder, part, name)) as f:
            return json.load(f)

    # the configs
    try:
        unet = config_from_json(UNetConfig, read_json("unet"))
        vae = config_from_json(VAEConfig, read_json("vae"))
        family = folder_family(unet)
        texts = [CLIPTextConfig.from_dict(read_json(part)) for part in convert.TEXT_PARTS[family]]
        configs = (unet, vae, *texts)
        if family == "sdxl":
            check_added_embedding(unet, texts[1].projection_dim)
        scheduler = {}
        if os.path.isdir(f"{folder}/scheduler"):
            scheduler = read_json("scheduler", "scheduler_config.json")
    except (OSError, ValueError) as e:
        raise LoadError(
            f"{folder} is not a diffusers SD folder we can load: {first_line(e)}"
        ) from None

    # the weights, under their own names
    parts = {}
    for part in PARTS[family]:
        files = [f"{folder}/{part}/{_variant(name, variant)}" for name in WEIGHTS[part]]
        found = [f for f in files if os.path.exists(f)]
        if not found:
            expected = " or ".join(map(os.path.basename, files))
            raise LoadError(f"no weights in {folder}/{part} (expected {expected})")
        tensors = read_tensors(found[0])
        # CLIPTextModel's transformers-4 names: without text_model, as 5 writes them
        parts[part] = {
            re.sub(r"^text_model\.", "", k) if part == "text_encoder" else k: t
            for k, t in tensors.items()
            if not convert.IGNORED.fullmatch(k)
        }

    # the latent side x the VAE's downsampling
    size = unet.sample_size * 2 ** (len(vae.block_out_channels) - 1)
    prediction = prediction_type or scheduler.get("prediction_type", "epsilon")
    return configs, parts, family, prediction, size


def _variant(name, variant):
    """The weight file name of a variant: with "fp16", model.safetensors ->
    model.fp16.safetensors."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.{variant}{ext}" if variant else name


def _download(repo, revision=None, variant=None):
    """The local folder of the files a diffusers SD repo needs, fetched (per part
    .safetensors, else .bin)."""
    configs = [f"{part}/config.json" for part in WEIGHTS]
    configs += ["tokenizer/*", "tokenizer_2/*", "scheduler/scheduler_config.json"]
    first = {part: f"{part}/{_variant(names[0], variant)}" for part, names in WEIGHTS.items()}
    second = {part: f"{part}/{_variant(names[1], variant)}" for part, names in WEIGHTS.items()}
    try:
        folder = huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=configs + list(first.values())
        )
        # the parts the repo has (SDXL: text_encoder_2), not in .safetensors
        old = [
            second[part]
            for part in WEIGHTS
            if os.path.exists(f"{folder}/{part}/config.json")
            and not os.path.exists(f"{folder}/{first[part]}")
        ]
        if not old:
            return folder
        return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=old)
    except Exception as e:
        # offline, unknown or gated repo: whatever huggingface_hub raises
        raise LoadError(
            f"cannot download {repo} from the Hugging Face hub (offline?): {first_line(e)}"
        ) from None


def _fill(model, tensors, device, dtype):
    """Assign tensors to a model built on the meta device: every key, no other, equal shapes."""
    want = model.state_dict()
    bad = {
        "missing": want.keys() - tensors.keys(),
        "unexpected": tensors.keys() - want.keys(),
        "wrong-shape": {
            k for k in want.keys() & tensors.keys() if want[k].shape != tensors[k].shape
        },
    }
    for problem, keys in bad.items():
        if keys:
            examples = ", ".join(sorted(keys)[:3])
            raise LoadError(
                f"{type(model).__name__}: {len(keys)} {problem} tensors, e.g. {examples}"
            )

    tensors = {k: t.to(device, dtype) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def load(
    source,
    *,
    tokenizer=None,
    device="cpu",
    dtype=torch.float32,
    revision=None,
    variant=None,
    prediction_type=None,
):
    """A StableDiffusion from a single file (.safetensors, .ckpt), a diffusers folder, a hub id or
    "toy". Tokenizer: a folder's own, else `tokenizer`, else SD v1's. revision: a hub branch, tag
    or commit; variant: *.VARIANT.* files. prediction_type: what the UNet outputs (PREDICTIONS);
    default: a folder's scheduler config, a file's metadata, else the family's (configs.stated)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {device}, but no CUDA GPU is here (use --device cpu)")
    if prediction_type not in (None, *PREDICTIONS):
        raise LoadError(
            f"--prediction-type must be one of {', '.join(PREDICTIONS)}, got {prediction_type!r}"
        )

    # where the model is: "toy", a file or folder, else a hub id to download
    source = str(source)
    path = source
    if source == "toy":
        path = f"{TOY_DIR}/toy.safetensors"
        tokenizer = tokenizer or f"{TOY_DIR}/tokenizer"
    if not os.path.exists(path):
        hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path)
        if not hub_id or path.endswith((".safetensors", ".ckpt")):
            raise LoadError(f"no such file or folder: {path}")
        path = _download(path, revision, variant)
    if variant and not os.path.isdir(path):
        raise LoadError(f"--variant is for diffusers folders and hub ids; {path} is a single file")

    # configs and tensors, then the models built on the meta device (no random init: every
    # tensor is assigned from the file)
    if os.path.isdir(path):
        configs, parts, family, prediction, size = _folder(path, variant, prediction_type)
    else:
        configs, parts, family, prediction, size = _single_file(path, prediction_type)
    tokenizers = text.load_tokenizers(path, tokenizer, family, configs[2:])
    with torch.device("meta"):
        models = {part: MODELS[part](config) for part, config in zip(parts, configs)}

    # The file's own dtype, before the tensors are cast to `dtype`
    source_dtype = next(iter(parts["unet"].values())).dtype

    # SDXL's VAE overflows in fp16 (diffusers' force_upcast): it stays fp32 while the rest runs
    # in fp16
    vae_dtype = torch.float32 if family == "sdxl" and dtype == torch.float16 else dtype
    models = {
        p: _fill(m, parts[p], device, vae_dtype if p == "vae" else dtype) for p, m in models.items()
    }

    # position ids are non-persistent, so in no file: arange(77)
    for part in convert.TEXT_PARTS[family]:
        # CLIPTextModelWithProjection keeps the text_model level
        embeddings = getattr(models[part], "text_model", models[part]).embeddings
        positions = torch.arange(embeddings.position_embedding.num_embeddings, device=device)
        embeddings.position_ids = positions[None]

    return StableDiffusion(
        models["unet"],
        models["vae"],
        models["text_encoder"],
        tokenizers[0],
        family,
        prediction,
        source,
        size,
        models.get("text_encoder_2"),
        *tokenizers[1:],  # SDXL: the second ones
        source_dtype=source_dtype,
    )


def ldm_state_dict(sd):
    """`sd` as an official single-file state dict: every key an official file of its family has
    (SD v1, 2.x: the schedule buffers too; SDXL keeps none), but the tensors no model of ours holds
    (convert.unused: SD 2.x's last OpenCLIP block and head, SDXL's logit_scale)."""
    ours = {
        f"{part}.{k}": t.detach()
        for part in PARTS[sd.family]
        for k, t in getattr(sd, part).state_dict().items()
    }
    tensors = {} if sd.family == "sdxl" else convert.schedule_buffers()

    # the official files carry CLIP ViT-L's position ids (transformers 4 saved them)
    if sd.family != "sd2":
        name = convert.ours_to_ldm("text_encoder.embeddings.position_ids", family=sd.family)
        tensors[name] = torch.arange(sd.text_encoder.config.max_position_embeddings)[None]

    # LDM's layout: 1x1 convs, fused q, k, v, x @ P
    for name, t in convert.to_ldm(ours, sd.family).items():
        tensors[convert.ours_to_ldm(name, sd.unet.config, sd.vae.config, sd.family)] = t
    return tensors


def save_single_file(sd, path, metadata=None, dtype=None):
    """Write `sd` as an official single .safetensors file (A1111, ComfyUI), its floating-point
    tensors in `dtype` (default: sd.source_dtype, the dtype it was read in), the model spec
    (architecture, image size, prediction type) in its metadata; atomic."""
    dtype = dtype or sd.source_dtype
    tensors = {
        k: (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()
        for k, t in ldm_state_dict(sd).items()
    }
    title = os.path.basename(str(path)).removesuffix(".safetensors")
    metadata = {
        **model_spec(sd.family, sd.prediction_type, sd.image_size, title),
        **(metadata or {}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def save_diffusers(sd, folder):
    """Write `sd` as a diffusers StableDiffusion(XL)Pipeline folder (loads with from_pretrained)."""
    if os.path.exists(folder):
        raise LoadError(f"{folder} exists: choose a new folder (nothing is overwritten)")

    def write(tmp):
        configs = diffusers_configs(sd.unet.config, sd.vae.config, sd.prediction_type, sd.family)
        for name, config in configs.items():
            os.makedirs(os.path.dirname(f"{tmp}/{name}"), exist_ok=True)
            with open(f"{tmp}/{name}", "w") as f:
                json.dump(config, f, indent=2)

        for part in ("unet", "vae"):
            state = getattr(sd, part).state_dict()
            weights = {k: t.detach().cpu().contiguous() for k, t in state.items()}
            save_file(weights, f"{tmp}/{part}/{WEIGHTS[part][0]}")

        # text_encoder, tokenizer; SDXL: text_encoder_2, tokenizer_2 too
        for part in convert.TEXT_PARTS[sd.family]:
            for name in (part, part.replace("text_encoder", "tokenizer")):
                getattr(sd, name).save_pretrained(f"{tmp}/{name}")

    atomic_write(folder, write)
