"""load_sd.py: Stable Diffusion checkpoints -> a StableDiffusion bundle (our UNet and VAE,
transformers' CLIP text encoder and tokenizer), and back to an official single file.

Sources: official LDM single files (Rombach et al., arXiv 2112.10752; names and configs by convert.py),
diffusers folders, hub ids.
"""
import dataclasses
import json
import os
import re
import shutil

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from convert import CLIP_MAX_LEN, IGNORED, VAE_ATTN_WEIGHT, infer_configs, ldm_to_ours, ours_to_ldm
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"  # SD v1's FrozenCLIPEmbedder (v1-inference.yaml)
FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2"}  # cross_attention_dim: CLIP ViT-L/14 (v1), OpenCLIP ViT-H (v2)
PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}  # weights
# SD v1.5's scheduler/scheduler_config.json: the DDIM that sampler.py implements.
DDIM_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # CLI names
DELTA_FORMAT = "esd-delta/1"  # metadata "format" of our ESD delta files
TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")


class LoadError(Exception):
    """A one-line, user-facing problem with the model source (CLIs print it and exit 2)."""


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

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Prompts -> CLIP's last hidden states [B, 77, D]."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=CLIP_MAX_LEN, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state

    @torch.no_grad()
    def decode_latents(self, latents):
        """Sampled (scaled) latents -> images in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor)

    def latent_shape(self, height, width):
        return (self.vae.config.latent_channels, height // self.vae.scale_factor, width // self.vae.scale_factor)


def _line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _read(path):
    """The tensors of a .safetensors file, or of a .ckpt/.bin read with weights_only (no pickled code)."""
    try:
        obj = load_file(path) if path.endswith(".safetensors") else torch.load(path, "cpu", weights_only=True)
    except Exception as e:  # any file we cannot read is bad input, whatever the library raises
        raise LoadError(f"cannot read {path}: {_line(e)}") from None
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict):
        raise LoadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _single_file(path):
    """(configs, our-named tensors per part, family, prediction type) of an LDM single file."""
    sd = _read(path)
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise LoadError("SD v2 single-file checkpoints are not supported yet (use its diffusers folder)")
    if not any(k.startswith("cond_stage_model.transformer.") for k in sd):
        found = "SDXL's conditioner.embedders.*" if any(k.startswith("conditioner.embedders.") for k in sd) else \
            "top-level names " + ", ".join(sorted({k.split(".")[0] for k in sd})[:6])
        raise LoadError(f"{path} is not an SD v1 checkpoint (no cond_stage_model.transformer.*): found {found}")
    try:
        configs = unet, vae, _ = infer_configs(sd)
    except (KeyError, IndexError) as e:
        raise LoadError(f"{path} is an incomplete SD v1 checkpoint: {_line(e)}") from None
    parts, names = {part: {} for part in PARTS}, {k: ldm_to_ours(k, unet, vae) for k in sd if not IGNORED.fullmatch(k)}
    leftover = [k for k, name in names.items() if name.partition(".")[0] not in parts]
    if leftover:
        raise LoadError(f"{path}: {len(leftover)} tensors of no SD v1 part, e.g. {', '.join(leftover[:3])}")
    for key, name in names.items():
        part, _, rest = name.partition(".")
        parts[part][rest] = sd[key].flatten(1) if VAE_ATTN_WEIGHT.fullmatch(name) else sd[key]  # 1x1 conv -> linear
    return configs, parts, "sd1", "epsilon"


def _folder(folder):
    """The same for a diffusers folder: configs from its config.json files, weights as they are."""
    def read_json(part, name="config.json"):
        with open(os.path.join(folder, part, name)) as f:
            return json.load(f)
    try:
        configs = (UNetConfig.from_dict(read_json("unet")), VAEConfig.from_dict(read_json("vae")),
                   CLIPTextConfig.from_dict(read_json("text_encoder")))
        scheduler = read_json("scheduler", "scheduler_config.json") if os.path.isdir(f"{folder}/scheduler") else {}
    except (OSError, ValueError) as e:
        raise LoadError(f"{folder} is not a diffusers SD folder we can load: {_line(e)}") from None
    parts = {}
    for part, stem in PARTS.items():
        files = [f for f in (f"{folder}/{part}/{stem}.safetensors", f"{folder}/{part}/{stem}.bin") if os.path.exists(f)]
        if not files:
            raise LoadError(f"no weights in {folder}/{part} (expected {stem}.safetensors or {stem}.bin)")
        parts[part] = {re.sub(r"^text_model\.", "", k): t for k, t in _read(files[0]).items() if not IGNORED.fullmatch(k)}
    unet = configs[0]  # linear projections: SD v2's hallmark where the context width is no real one (tests)
    family = FAMILY_BY_CONTEXT.get(unet.cross_attention_dim, "sd2" if unet.use_linear_projection else "sd1")
    return configs, parts, family, scheduler.get("prediction_type", "epsilon")


def _download(repo):
    """Fetch only the files a diffusers SD repo needs (safetensors, else .bin); its local folder."""
    patterns = [f"{part}/config.json" for part in PARTS] + ["tokenizer/*", "scheduler/scheduler_config.json"]
    try:
        folder = snapshot_download(repo, allow_patterns=patterns + [f"{p}/{s}.safetensors" for p, s in PARTS.items()])
        old = [f"{p}/{s}.bin" for p, s in PARTS.items() if not os.path.exists(f"{folder}/{p}/{s}.safetensors")]
        return snapshot_download(repo, allow_patterns=old) if old else folder
    except Exception as e:  # offline, unknown or gated repo: whatever huggingface_hub raises
        raise LoadError(f"cannot download {repo} from the Hugging Face hub (offline?): {_line(e)}") from None


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


def load(source, *, tokenizer=None, device="cpu", dtype=torch.float32):
    """A StableDiffusion from a single file (.safetensors, .ckpt), a diffusers folder, a hub id or "toy".
    The tokenizer: a folder's own tokenizer/, else `tokenizer` (folder or hub id), else SD v1's."""
    source = str(source)
    path, tokenizer = (f"{TOY_DIR}/toy.safetensors", tokenizer or f"{TOY_DIR}/tokenizer") if source == "toy" else (source, tokenizer)
    if not os.path.exists(path):
        if source == "toy":
            raise LoadError("the toy model is not shipped yet (no assets/toy/ beside load_sd.py)")
        if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) or path.endswith((".safetensors", ".ckpt")):
            raise LoadError(f"no such file or folder: {path}")
        path = _download(path)
    configs, parts, family, prediction = _folder(path) if os.path.isdir(path) else _single_file(path)
    tokenizer = f"{path}/tokenizer" if os.path.isdir(f"{path}/tokenizer") else tokenizer or DEFAULT_TOKENIZER
    try:  # transformers 5 quietly returns an empty tokenizer for a repo it cannot find: check the size too
        tok = CLIPTokenizer.from_pretrained(tokenizer)
        problem = f"{len(tok)} tokens for {configs[2].vocab_size} embeddings" if len(tok) != configs[2].vocab_size else ""
    except Exception as e:  # offline hub, missing folder: whatever transformers raises
        problem = _line(e)
    if problem:
        raise LoadError(f"cannot load the CLIP tokenizer {tokenizer} (offline? pass a folder): {problem}")
    if not os.path.isdir(path):  # a single file has no text config: special tokens are the tokenizer's
        configs[2].update({f"{s}_token_id": getattr(tok, f"{s}_token_id") for s in ("bos", "eos", "pad")})
    with torch.device("meta"):  # no random init: every tensor is assigned from the file
        models = UNet(configs[0]), VAE(configs[1]), CLIPTextModel(configs[2])
    unet, vae, text_encoder = (_fill(m, parts[p], device, dtype) for m, p in zip(models, PARTS))
    text_encoder.embeddings.register_buffer(  # non-persistent, so in no file: arange(77)
        "position_ids", torch.arange(configs[2].max_position_embeddings, device=device)[None], persistent=False)
    return StableDiffusion(unet, vae, text_encoder, tok, family, prediction, source)


def save_single_file(sd, path, metadata=None):
    """Write `sd` as an official LDM-layout (SD v1) .safetensors file, atomically."""
    if sd.family != "sd1":
        raise LoadError(f"only SD v1 has a single-file layout we write (this model is {sd.family})")
    tensors = {ours_to_ldm("text_encoder.embeddings.position_ids"):  # the official files carry it
               torch.arange(sd.text_encoder.config.max_position_embeddings)[None]}
    for part, model in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        for key, t in model.state_dict().items():
            name = f"{part}.{key}"
            t = t[:, :, None, None] if VAE_ATTN_WEIGHT.fullmatch(name) else t  # linear -> LDM's 1x1 conv
            tensors[ours_to_ldm(name, sd.unet.config, sd.vae.config)] = t.detach().cpu().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def atomic_write(path, write):
    """write(tmp) into a temporary name beside `path`, then rename: a crash never leaves half a file
    (or half a folder) where a good one was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def save_delta(path, delta, metadata):
    """An ESD delta (trained UNet tensors, diffusers names) as .safetensors with string metadata, atomically."""
    metadata = {"format": DELTA_FORMAT, **{k: str(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(delta, tmp, metadata))


def load_delta(path):
    """(tensors, metadata) of a delta: ours, or official ESD weights with diffusers names (.safetensors, .pt)."""
    tensors = _read(path)  # .pt: weights_only, no pickled code
    if not path.endswith(".safetensors"):
        return tensors, {}
    with safe_open(path, framework="pt") as f:
        return tensors, f.metadata() or {}


@torch.no_grad()
def apply_delta(unet, delta):
    """Copy a delta's tensors into `unet`; LoadError, with nothing copied, if a name or shape does not fit."""
    params = dict(unet.named_parameters())
    bad = [k for k, v in delta.items() if k not in params or params[k].shape != v.shape]
    if bad or not delta:
        raise LoadError(f"the delta does not fit this UNet: {len(bad)} of {len(delta)} tensors have unknown "
                        f"names or other shapes{', e.g. ' + bad[0] if bad else ''}")
    for k, v in delta.items():
        params[k].copy_(v)
    return unet


def save_diffusers(sd, folder):
    """Write `sd` as a diffusers StableDiffusionPipeline folder (loads with from_pretrained)."""
    if os.path.exists(folder):
        raise LoadError(f"{folder} exists: choose a new folder (nothing is overwritten)")
    levels = len(sd.vae.config.block_out_channels)
    configs = {"unet": dict(dataclasses.asdict(sd.unet.config), _class_name="UNet2DConditionModel"),
               "vae": dict(dataclasses.asdict(sd.vae.config), _class_name="AutoencoderKL",
                           down_block_types=["DownEncoderBlock2D"] * levels,
                           up_block_types=["UpDecoderBlock2D"] * levels),
               "scheduler": dict(DDIM_SCHEDULER, prediction_type=sd.prediction_type)}
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}

    def write(tmp):
        for part, config in dict(configs, **{"": index}).items():
            os.makedirs(f"{tmp}/{part}", exist_ok=True)
            with open(f"{tmp}/{part}/{'scheduler_config' if part == 'scheduler' else 'config' if part else 'model_index'}.json", "w") as f:
                json.dump(config, f, indent=2)
        for part in ("unet", "vae"):
            weights = {k: t.detach().cpu().contiguous() for k, t in getattr(sd, part).state_dict().items()}
            save_file(weights, f"{tmp}/{part}/{PARTS[part]}.safetensors")
        sd.text_encoder.save_pretrained(f"{tmp}/text_encoder")
        sd.tokenizer.save_pretrained(f"{tmp}/tokenizer")
    atomic_write(folder, write)
