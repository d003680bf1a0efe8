"""load_sd.py: Stable Diffusion checkpoints (SD v1, 2.x, XL) -> a StableDiffusion bundle (our UNet and VAE,
transformers' CLIP text encoders and tokenizers), and back to an official single file or a diffusers folder.

Sources: official LDM / sgm single files (Rombach et al., arXiv 2112.10752; Podell et al., arXiv 2307.01952; names
by convert.py, configs by configs.py), diffusers folders, hub ids."""

import dataclasses
import json
import os
import re

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import convert
import text
from configs import (
    PREDICTION,
    RESOLUTION,
    config_from_json,
    diffusers_configs,
    file_family,
    folder_family,
    infer_configs,
    stated,
)
from files import LoadError, atomic_write, first_line, read_metadata, read_tensors
from sampler import PREDICTIONS
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FAMILY_NAMES = {"sd1": "SD v1", "sd2": "SD 2.x", "sdxl": "SDXL"}
PREDICTION_HELP = "what the UNet predicts (default: a folder's scheduler, a file's metadata, else SD 2.x v, others epsilon)"
# Weight file names per part, tried in order (.bin: older repos): diffusers' for models, transformers' for CLIP.
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),
}  # SDXL's second
MODELS = {
    "unet": UNet,
    "vae": VAE,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}
PARTS = {
    family: ("unet", "vae", *texts) for family, texts in convert.TEXT_PARTS.items()
}  # a family's models
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}  # CLI names
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")


@dataclasses.dataclass
class StableDiffusion:
    """A loaded model: our UNet and VAE, transformers' CLIP text encoder and tokenizer (SDXL: two of each)."""

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
    warned: set = dataclasses.field(default_factory=set, repr=False)  # prompts said to be too long

    def encode_prompts(self, prompts, size=None):
        """Prompts -> their conditioning (text.py; a prompt past 77 tokens is cut, said the first time): the text
        context [B, 77, D]; SDXL: (context, added), the size numbers of a `size` (height, width) image, default
        the model's."""
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
        """Sampled (scaled) latents -> images in [-1, 1], decoded in the VAE's dtype (see load: SDXL's fp32)."""
        return self.vae.decode(
            latents.to(self.vae.post_quant_conv.weight.dtype) / self.vae.config.scaling_factor
        )

    def latent_shape(self, height, width):
        return (
            self.vae.config.latent_channels,
            height // self.vae.scale_factor,
            width // self.vae.scale_factor,
        )


def _single_file(path, prediction_type=None):
    """(configs, our-named tensors per part, family, prediction type, image size) of an LDM single file."""
    sd = read_tensors(path)
    family = file_family(sd)
    if (
        family is None
    ):  # the names it has instead, SDXL's conditioner by embedder (the refiner's is embedders.0.model)
        found = sorted(
            {".".join(k.split(".")[: 3 if k.startswith("conditioner.") else 1]) for k in sd}
        )
        raise LoadError(
            f"{path} is not an SD v1, 2.x or XL base checkpoint (no cond_stage_model.* or "
            f"{convert.XL_OPENCLIP}*): found {', '.join(found[:6])}"
        )
    try:
        configs = unet, vae, text, *_ = infer_configs(sd, family)
    except (KeyError, IndexError) as e:
        raise LoadError(
            f"{path} is an incomplete {FAMILY_NAMES[family]} checkpoint: {first_line(e)}"
        ) from None
    parts = {part: {} for part in PARTS[family]}
    names = {
        k: convert.ldm_to_ours(k, unet, vae, family)
        for k in sd
        if not convert.IGNORED.fullmatch(k) and not convert.unused(k, text)
    }
    leftover = [k for k, name in names.items() if name.partition(".")[0] not in parts]
    if leftover:
        raise LoadError(
            f"{path}: {len(leftover)} tensors of no {FAMILY_NAMES[family]} part, e.g. {', '.join(leftover[:3])}"
        )
    for key, name in names.items():
        for ours, t in convert.to_ours(
            name, sd[key]
        ).items():  # our layout: linear VAE attention, q, k, v apart, ...
            part, _, rest = ours.partition(".")
            parts[part][rest] = t
    return (configs, parts, family, *stated(read_metadata(path), family, prediction_type))


def _folder(folder, variant=None, prediction_type=None):
    """The same for a diffusers folder: configs from its config.json files, weights as they are."""

    def read_json(part, name="config.json"):
        with open(os.path.join(folder, part, name)) as f:
            return json.load(f)

    try:
        unet, vae = (
            config_from_json(cls, read_json(part))
            for cls, part in ((UNetConfig, "unet"), (VAEConfig, "vae"))
        )
        family = folder_family(unet)
        configs = (
            unet,
            vae,
            *(CLIPTextConfig.from_dict(read_json(part)) for part in convert.TEXT_PARTS[family]),
        )
        scheduler = (
            read_json("scheduler", "scheduler_config.json")
            if os.path.isdir(f"{folder}/scheduler")
            else {}
        )
    except (OSError, ValueError) as e:
        raise LoadError(
            f"{folder} is not a diffusers SD folder we can load: {first_line(e)}"
        ) from None
    parts = {}
    for part in PARTS[family]:
        files = [f"{folder}/{part}/{_variant(name, variant)}" for name in WEIGHTS[part]]
        found = [f for f in files if os.path.exists(f)]
        if not found:
            raise LoadError(
                f"no weights in {folder}/{part} (expected {' or '.join(map(os.path.basename, files))})"
            )
        tensors = read_tensors(
            found[0]
        )  # CLIPTextModel's transformers-4 names: without text_model, as 5 writes them
        parts[part] = {
            re.sub(r"^text_model\.", "", k) if part == "text_encoder" else k: t
            for k, t in tensors.items()
            if not convert.IGNORED.fullmatch(k)
        }
    size = unet.sample_size * 2 ** (
        len(vae.block_out_channels) - 1
    )  # latent side x the VAE's downsampling
    return (
        configs,
        parts,
        family,
        prediction_type or scheduler.get("prediction_type", "epsilon"),
        size,
    )


def _variant(name, variant):
    """diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.fp16.safetensors for variant "fp16"."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.{variant}{ext}" if variant else name


def _download(repo, revision=None, variant=None):
    """Fetch only the files a diffusers SD repo needs (per part .safetensors, else .bin); its local folder."""
    configs = [f"{part}/config.json" for part in WEIGHTS] + [
        "tokenizer/*",
        "tokenizer_2/*",
        "scheduler/scheduler_config.json",
    ]
    first, second = (
        {part: f"{part}/{_variant(names[i], variant)}" for part, names in WEIGHTS.items()}
        for i in (0, 1)
    )
    try:
        folder = snapshot_download(
            repo, revision=revision, allow_patterns=configs + list(first.values())
        )
        old = [
            second[part]
            for part in WEIGHTS  # the parts the repo has (SDXL: text_encoder_2), not in .safetensors
            if os.path.exists(f"{folder}/{part}/config.json")
            and not os.path.exists(f"{folder}/{first[part]}")
        ]
        return snapshot_download(repo, revision=revision, allow_patterns=old) if old else folder
    except Exception as e:  # offline, unknown or gated repo: whatever huggingface_hub raises
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
            raise LoadError(
                f"{type(model).__name__}: {len(keys)} {problem} tensors, e.g. {', '.join(sorted(keys)[:3])}"
            )
    model.load_state_dict(
        {k: t.to(device, dtype) for k, t in tensors.items()}, strict=True, assign=True
    )
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
    """A StableDiffusion from a single file (.safetensors, .ckpt), a diffusers folder, a hub id or "toy". Tokenizer:
    a folder's own, else `tokenizer`, else SD v1's. revision: a hub branch, tag or commit; variant: *.VARIANT.* files.
    prediction_type: what the UNet outputs (PREDICTIONS); default: a folder's scheduler config, a file's metadata,
    else the family's (configs.stated)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {device}, but no CUDA GPU is here (use --device cpu)")
    if prediction_type not in (None, *PREDICTIONS):
        raise LoadError(
            f"--prediction-type must be one of {', '.join(PREDICTIONS)}, got {prediction_type!r}"
        )
    source = str(source)
    path, tokenizer = (
        (f"{TOY_DIR}/toy.safetensors", tokenizer or f"{TOY_DIR}/tokenizer")
        if source == "toy"
        else (source, tokenizer)
    )
    if not os.path.exists(path):
        if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) or path.endswith(
            (".safetensors", ".ckpt")
        ):
            raise LoadError(f"no such file or folder: {path}")
        path = _download(path, revision, variant)
    if variant and not os.path.isdir(path):
        raise LoadError(f"--variant is for diffusers folders and hub ids; {path} is a single file")
    configs, parts, family, prediction, size = (
        _folder(path, variant, prediction_type)
        if os.path.isdir(path)
        else _single_file(path, prediction_type)
    )
    tokenizers = text.load_tokenizers(path, tokenizer, family, configs[2:])
    with torch.device("meta"):  # no random init: every tensor is assigned from the file
        models = {part: MODELS[part](config) for part, config in zip(parts, configs)}
    # SDXL's VAE overflows in fp16 (diffusers' force_upcast): it stays fp32 while the rest runs in fp16
    vae_dtype = torch.float32 if family == "sdxl" and dtype == torch.float16 else dtype
    models = {
        p: _fill(m, parts[p], device, vae_dtype if p == "vae" else dtype) for p, m in models.items()
    }
    for part in convert.TEXT_PARTS[
        family
    ]:  # position ids are non-persistent, so in no file: arange(77)
        embeddings = getattr(
            models[part], "text_model", models[part]
        ).embeddings  # WithProjection keeps text_model
        embeddings.position_ids = torch.arange(
            embeddings.position_embedding.num_embeddings, device=device
        )[None]
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
        *tokenizers[1:],
    )  # SDXL: the second ones


def ldm_state_dict(sd):
    """`sd` as an official single-file state dict: every key an official file of its family has (SD v1, 2.x: the
    schedule buffers too; SDXL keeps none), but the tensors no model of ours holds (convert.unused: SD 2.x's last
    OpenCLIP block and head, SDXL's logit_scale)."""
    ours = {
        f"{part}.{k}": t.detach()
        for part in PARTS[sd.family]
        for k, t in getattr(sd, part).state_dict().items()
    }
    tensors = {} if sd.family == "sdxl" else convert.schedule_buffers()
    if sd.family != "sd2":  # the official files carry CLIP ViT-L's (transformers 4 saved them)
        tensors[convert.ours_to_ldm("text_encoder.embeddings.position_ids", family=sd.family)] = (
            torch.arange(sd.text_encoder.config.max_position_embeddings)[None]
        )
    for name, t in convert.to_ldm(
        ours, sd.family
    ).items():  # LDM's layout: 1x1 convs, fused q, k, v, x @ P
        tensors[convert.ours_to_ldm(name, sd.unet.config, sd.vae.config, sd.family)] = t
    return tensors


def save_single_file(sd, path, metadata=None):
    """Write `sd` as an official single .safetensors file (A1111, ComfyUI), its image size and prediction type in the
    model-spec metadata; atomic."""
    tensors = {k: t.cpu().contiguous() for k, t in ldm_state_dict(sd).items()}
    metadata = {
        RESOLUTION: f"{sd.image_size}x{sd.image_size}",
        PREDICTION: sd.prediction_type.removesuffix("_prediction"),
        **(metadata or {}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def save_diffusers(sd, folder):
    """Write `sd` as a diffusers StableDiffusion(XL)Pipeline folder (loads with from_pretrained)."""
    if os.path.exists(folder):
        raise LoadError(f"{folder} exists: choose a new folder (nothing is overwritten)")

    def write(tmp):
        for name, config in diffusers_configs(
            sd.unet.config, sd.vae.config, sd.prediction_type, sd.family
        ).items():
            os.makedirs(os.path.dirname(f"{tmp}/{name}"), exist_ok=True)
            with open(f"{tmp}/{name}", "w") as f:
                json.dump(config, f, indent=2)
        for part in ("unet", "vae"):
            weights = {
                k: t.detach().cpu().contiguous() for k, t in getattr(sd, part).state_dict().items()
            }
            save_file(weights, f"{tmp}/{part}/{WEIGHTS[part][0]}")
        for part in convert.TEXT_PARTS[
            sd.family
        ]:  # text_encoder, tokenizer; SDXL: text_encoder_2, tokenizer_2 too
            for name in (part, part.replace("text_encoder", "tokenizer")):
                getattr(sd, name).save_pretrained(f"{tmp}/{name}")

    atomic_write(folder, write)
