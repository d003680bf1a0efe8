"""load_sd.py: Stable Diffusion checkpoints -> a StableDiffusion bundle (our UNet and VAE,
transformers' CLIP text encoder and tokenizer), and back to an official single file or a diffusers folder.

Sources: official LDM single files (Rombach et al., arXiv 2112.10752; names by convert.py, configs by configs.py),
diffusers folders, hub ids."""
import dataclasses
import json
import os
import re

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import convert
import text
from configs import config_from_json, diffusers_configs, infer_configs
from files import LoadError, atomic_write, first_line, read_metadata, read_tensors
from sampler import PREDICTIONS
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2"}  # cross_attention_dim: CLIP ViT-L/14 (v1), OpenCLIP ViT-H (v2)
FAMILY_NAMES = {"sd1": "SD v1", "sd2": "SD 2.x"}
# Where a single file's metadata is silent (the official files' is): SD v1 and the SD 2.x "base" files are epsilon
# models of 512 px, other SD 2.x files (v2-1_768-ema-pruned) v-models of 768 px, as diffusers takes them.
SD1_SIZE, SD2_V_SIZE = 512, 768
PREDICTION_HELP = "what the UNet predicts (default: a folder's scheduler, a file's metadata, else SD 2.x v, SD v1 epsilon)"
RESOLUTION = "modelspec.resolution"  # safetensors metadata "WxH" (Stability's model spec), e.g. "1024x1024"
PREDICTION = "modelspec.prediction_type"  # the same spec's "epsilon" or "v"
SPEC_PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}  # -> PREDICTIONS
# Weight file names per part, tried in order (.bin: older repos): diffusers' for models, transformers' for CLIP.
WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "text_encoder": ("model.safetensors", "pytorch_model.bin")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # CLI names
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")


@dataclasses.dataclass
class StableDiffusion:
    """A loaded model: our UNet and VAE, transformers' CLIP text encoder and tokenizer."""
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    family: str  # "sd1" | "sd2"
    prediction_type: str  # "epsilon" | "v_prediction"
    source: str
    image_size: int = 512  # the side it was trained at: sample.py's default
    warned: set = dataclasses.field(default_factory=set, repr=False)  # prompts said to be too long

    def encode_prompts(self, prompts):
        """Prompts -> the text context [B, 77, D] (text.py); a prompt past 77 tokens is cut, said the first time."""
        return text.encode(self.tokenizer, self.text_encoder, prompts, self.warned)

    @torch.no_grad()
    def decode_latents(self, latents):
        """Sampled (scaled) latents -> images in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor)

    def latent_shape(self, height, width):
        return (self.vae.config.latent_channels, height // self.vae.scale_factor, width // self.vae.scale_factor)


def _single_file(path, prediction_type=None):
    """(configs, our-named tensors per part, family, prediction type, image size) of an LDM single file."""
    sd = read_tensors(path)
    family = "sd2" if any(k.startswith(convert.OPENCLIP) for k in sd) else "sd1"
    if family == "sd1" and not any(k.startswith("cond_stage_model.transformer.") for k in sd):
        found = "SDXL's conditioner.embedders.*" if any(k.startswith("conditioner.embedders.") for k in sd) else \
            "top-level names " + ", ".join(sorted({k.split(".")[0] for k in sd})[:6])
        raise LoadError(f"{path} is not an SD v1 or 2.x checkpoint (no cond_stage_model.*): found {found}")
    try:
        configs = unet, vae, text = infer_configs(sd, family)
    except (KeyError, IndexError) as e:
        raise LoadError(f"{path} is an incomplete {FAMILY_NAMES[family]} checkpoint: {first_line(e)}") from None
    parts = {part: {} for part in WEIGHTS}
    names = {k: convert.ldm_to_ours(k, unet, vae, family) for k in sd
             if not convert.IGNORED.fullmatch(k) and not convert.unused(k, text)}
    leftover = [k for k, name in names.items() if name.partition(".")[0] not in parts]
    if leftover:
        raise LoadError(f"{path}: {len(leftover)} tensors of no {FAMILY_NAMES[family]} part, e.g. {', '.join(leftover[:3])}")
    for key, name in names.items():
        tensor = sd[key].flatten(1) if convert.VAE_ATTN_WEIGHT.fullmatch(name) else sd[key]  # conv -> linear
        for ours, t in convert.split_in_proj(name, tensor).items():  # SD 2.x: q, k, v apart
            part, _, rest = ours.partition(".")
            parts[part][rest] = t
    return (configs, parts, family, *_stated(path, family, prediction_type))


def _stated(path, family, prediction_type):
    """A single file's prediction type and image side: `prediction_type`, else what its model-spec metadata states
    ("v", "512x512"), else the family's (see SD1_SIZE); an SD 2.x epsilon model is a 512 px base model."""
    metadata = read_metadata(path)
    default = "v_prediction" if family == "sd2" else "epsilon"
    prediction = prediction_type or SPEC_PREDICTIONS.get(metadata.get(PREDICTION), default)
    size = re.fullmatch(r"(\d+)x\d+", metadata.get(RESOLUTION, ""))
    return prediction, int(size[1]) if size else SD2_V_SIZE if family == "sd2" and prediction == "v_prediction" else SD1_SIZE


def _folder(folder, variant=None, prediction_type=None):
    """The same for a diffusers folder: configs from its config.json files, weights as they are."""
    def read_json(part, name="config.json"):
        with open(os.path.join(folder, part, name)) as f:
            return json.load(f)
    try:
        unet, vae = (config_from_json(cls, read_json(part)) for cls, part in ((UNetConfig, "unet"), (VAEConfig, "vae")))
        configs = unet, vae, CLIPTextConfig.from_dict(read_json("text_encoder"))
        scheduler = read_json("scheduler", "scheduler_config.json") if os.path.isdir(f"{folder}/scheduler") else {}
    except (OSError, ValueError) as e:
        raise LoadError(f"{folder} is not a diffusers SD folder we can load: {first_line(e)}") from None
    parts = {}
    for part, names in WEIGHTS.items():
        files = [f"{folder}/{part}/{_variant(name, variant)}" for name in names]
        found = [f for f in files if os.path.exists(f)]
        if not found:
            raise LoadError(f"no weights in {folder}/{part} (expected {' or '.join(map(os.path.basename, files))})")
        tensors = read_tensors(found[0])
        parts[part] = {re.sub(r"^text_model\.", "", k): t for k, t in tensors.items() if not convert.IGNORED.fullmatch(k)}
    # linear projections: SD v2's hallmark where the context width is no real one (tests)
    family = FAMILY_BY_CONTEXT.get(unet.cross_attention_dim, "sd2" if unet.use_linear_projection else "sd1")
    size = unet.sample_size * 2 ** (len(vae.block_out_channels) - 1)  # latent side x the VAE's downsampling
    return configs, parts, family, prediction_type or scheduler.get("prediction_type", "epsilon"), size


def _variant(name, variant):
    """diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.fp16.safetensors for variant "fp16"."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.{variant}{ext}" if variant else name


def _download(repo, revision=None, variant=None):
    """Fetch only the files a diffusers SD repo needs (per part .safetensors, else .bin); its local folder."""
    configs = [f"{part}/config.json" for part in WEIGHTS] + ["tokenizer/*", "scheduler/scheduler_config.json"]
    first, second = ({part: f"{part}/{_variant(names[i], variant)}" for part, names in WEIGHTS.items()} for i in (0, 1))
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=configs + list(first.values()))
        old = [second[part] for part in WEIGHTS if not os.path.exists(f"{folder}/{first[part]}")]
        return snapshot_download(repo, revision=revision, allow_patterns=old) if old else folder
    except Exception as e:  # offline, unknown or gated repo: whatever huggingface_hub raises
        raise LoadError(f"cannot download {repo} from the Hugging Face hub (offline?): {first_line(e)}") from None


def _fill(model, tensors, device, dtype):
    """Assign tensors to a model built on the meta device: every key, no other, equal shapes."""
    want = model.state_dict()
    bad = {"missing": want.keys() - tensors.keys(), "unexpected": tensors.keys() - want.keys(),
           "wrong-shape": {k for k in want.keys() & tensors.keys() if want[k].shape != tensors[k].shape}}
    for problem, keys in bad.items():
        if keys:
            raise LoadError(f"{type(model).__name__}: {len(keys)} {problem} tensors, e.g. {', '.join(sorted(keys)[:3])}")
    model.load_state_dict({k: t.to(device, dtype) for k, t in tensors.items()}, strict=True, assign=True)
    return model.eval()


def load(source, *, tokenizer=None, device="cpu", dtype=torch.float32, revision=None, variant=None,
         prediction_type=None):
    """A StableDiffusion from a single file (.safetensors, .ckpt), a diffusers folder, a hub id or "toy". Tokenizer:
    a folder's own, else `tokenizer`, else SD v1's. revision: a hub branch, tag or commit; variant: *.VARIANT.* files.
    prediction_type: what the UNet outputs (PREDICTIONS); default: a folder's scheduler config, a file's metadata,
    else the family's (see SD1_SIZE)."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {device}, but no CUDA GPU is here (use --device cpu)")
    if prediction_type not in (None, *PREDICTIONS):
        raise LoadError(f"--prediction-type must be one of {', '.join(PREDICTIONS)}, got {prediction_type!r}")
    source = str(source)
    path, tokenizer = (f"{TOY_DIR}/toy.safetensors", tokenizer or f"{TOY_DIR}/tokenizer") if source == "toy" else (source, tokenizer)
    if not os.path.exists(path):
        if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) or path.endswith((".safetensors", ".ckpt")):
            raise LoadError(f"no such file or folder: {path}")
        path = _download(path, revision, variant)
    if variant and not os.path.isdir(path):
        raise LoadError(f"--variant is for diffusers folders and hub ids; {path} is a single file")
    configs, parts, family, prediction, size = (_folder(path, variant, prediction_type) if os.path.isdir(path)
                                                else _single_file(path, prediction_type))
    own = f"{path}/tokenizer" if os.path.isdir(f"{path}/tokenizer") else None  # a folder's: as it pads
    tok = text.load_tokenizer(own or tokenizer or text.DEFAULT_TOKENIZER, configs[2].vocab_size, None if own else family)
    if not os.path.isdir(path):  # a single file has no text config: special tokens are the tokenizer's
        configs[2].update({f"{s}_token_id": getattr(tok, f"{s}_token_id") for s in ("bos", "eos", "pad")})
    with torch.device("meta"):  # no random init: every tensor is assigned from the file
        models = UNet(configs[0]), VAE(configs[1]), CLIPTextModel(configs[2])
    unet, vae, text_encoder = (_fill(m, parts[p], device, dtype) for m, p in zip(models, WEIGHTS))
    text_encoder.embeddings.register_buffer(  # non-persistent, so in no file: arange(77)
        "position_ids", torch.arange(configs[2].max_position_embeddings, device=device)[None], persistent=False)
    return StableDiffusion(unet, vae, text_encoder, tok, family, prediction, source, size)


def ldm_state_dict(sd):
    """`sd` (SD v1 or 2.x) as an official LDM-layout state dict: every key an official file has, schedule buffers
    included; but for SD 2.x the tensors no SD 2.x model holds (convert.unused: OpenCLIP's last block and head)."""
    if sd.family not in FAMILY_NAMES:
        raise LoadError(f"only SD v1 and 2.x have a single-file layout we write (this model is {sd.family})")
    ours = {f"{part}.{k}": t.detach() for part in WEIGHTS for k, t in getattr(sd, part).state_dict().items()}
    tensors = convert.schedule_buffers()
    if sd.family == "sd1":  # the official files carry it
        tensors[convert.ours_to_ldm("text_encoder.embeddings.position_ids")] = torch.arange(
            sd.text_encoder.config.max_position_embeddings)[None]
    for name, t in (convert.fuse_in_proj(ours) if sd.family == "sd2" else ours).items():  # SD 2.x: q, k, v fused
        t = t[:, :, None, None] if convert.VAE_ATTN_WEIGHT.fullmatch(name) else t  # linear -> LDM's 1x1 conv
        tensors[convert.ours_to_ldm(name, sd.unet.config, sd.vae.config, sd.family)] = t
    return tensors


def save_single_file(sd, path, metadata=None):
    """Write `sd` as an official single .safetensors file (A1111, ComfyUI), its image size and prediction type in the
    model-spec metadata; atomic."""
    tensors = {k: t.cpu().contiguous() for k, t in ldm_state_dict(sd).items()}
    metadata = {RESOLUTION: f"{sd.image_size}x{sd.image_size}", PREDICTION: sd.prediction_type.removesuffix("_prediction"),
                **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def save_diffusers(sd, folder):
    """Write `sd` as a diffusers StableDiffusionPipeline folder (loads with from_pretrained)."""
    if os.path.exists(folder):
        raise LoadError(f"{folder} exists: choose a new folder (nothing is overwritten)")

    def write(tmp):
        for name, config in diffusers_configs(sd.unet.config, sd.vae.config, sd.prediction_type).items():
            os.makedirs(os.path.dirname(f"{tmp}/{name}"), exist_ok=True)
            with open(f"{tmp}/{name}", "w") as f:
                json.dump(config, f, indent=2)
        for part in ("unet", "vae"):
            weights = {k: t.detach().cpu().contiguous() for k, t in getattr(sd, part).state_dict().items()}
            save_file(weights, f"{tmp}/{part}/{WEIGHTS[part][0]}")
        sd.text_encoder.save_pretrained(f"{tmp}/text_encoder")
        sd.tokenizer.save_pretrained(f"{tmp}/tokenizer")
    atomic_write(folder, write)
