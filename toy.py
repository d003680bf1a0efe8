"""toy.py: an offline Stable Diffusion in miniature, trained from scratch on a CPU in minutes.

Captioned 32x32 images of one shape in one color; our UNet and VAE, a tiny transformers CLIP text
encoder and a CLIP BPE tokenizer written here, trained with the DDPM eps loss (Ho et al. arXiv
2006.11239, eqs. 4, 14) on SD's schedule, saved as an official SD v1 single file (LDM names, arXiv
2112.10752): it loads like a real one.

    python toy.py train            # all stages, ~29 minutes on 2 CPU cores; writes assets/toy/
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import load_sd
import sampler
from configs import CLIP_ACT
from text import CLIP_MAX_LEN
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

# Each shape: is the point (dx, dy) from its centre inside it, for half-size r (y grows downwards).
SHAPES = {
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    # about the circle's area
    "square": lambda dx, dy, r: dx.abs().maximum(dy.abs()) <= 0.85 * r,
    # apex up
    "triangle": lambda dx, dy, r: (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= (dy + r) / 1.8),
    "cross": lambda dx, dy, r: (
        (dx.abs().minimum(dy.abs()) <= r / 3) & (dx.abs().maximum(dy.abs()) <= r)
    ),
}
COLORS = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
WORDS = ("a", *COLORS, *SHAPES, "shape")  # the toy language; each word is one token
IMAGE_SIZE = 32  # image side in pixels
# the toy's sampling defaults, sampler.generate's
DDIM_STEPS = 20
GUIDANCE = 5.0
SAMPLING = dict(steps=DDIM_STEPS, guidance=GUIDANCE, height=IMAGE_SIZE, width=IMAGE_SIZE)
# train.py --model toy: ESD's settings for the toy, under any flag given (docs/results.md's
# measurements use them).
ESD = dict(resolution=IMAGE_SIZE, steps=DDIM_STEPS, lr=1e-3, iterations=350, device="cpu")
SUPERSAMPLE = 4  # shapes are drawn on a 4x finer grid and averaged down: anti-aliased edges
RADIUS = (5.0, 11.0)  # shape half-size range in pixels
# Caption odds: "a red circle", "a circle", "a red shape", "" (CFG: Ho & Salimans arXiv
# 2207.12598); "a" 50% dropped.
CAPTION_KINDS = {"full": 0.6, "shape": 0.15, "color": 0.15, "empty": 0.1}
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")
# file names in ASSETS
CHECKPOINT = "toy.safetensors"
CLASSIFIER = "classifier.safetensors"
# SD v1 constants kept (GroupNorm 32, 8 heads, 64-wide CLIP heads, quick_gelu, 77 positions):
# load_sd infers these configs from shapes. Cross-attention only at 4x4 and 2x2 (SD: the 3 finest
# levels): at 8x8 it doubles the CPU time.
UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    sample_size=8,
)
# 4x down: 32x32 images, 8x8 latents
VAE_CONFIG = dict(block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=IMAGE_SIZE)
# CLIP's text encoder in miniature: its MLP 4x as wide, its 64-wide heads, SD v1's 77 positions
# and quick_gelu
TEXT = dict(
    hidden_size=64,
    intermediate_size=4 * 64,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=CLIP_MAX_LEN,
    hidden_act=CLIP_ACT,
)
BATCH = {"vae": 32, "classifier": 128, "unet": 64}  # images per Adam step, per stage
LR = {"vae": 1e-3, "classifier": 2e-3, "unet": 1e-3}  # peak Adam learning rates, per stage
KL_WEIGHT = 1e-6  # LDM's kl_weight for its autoencoders


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0  # every stage draws from generators seeded from this
    images: int = 40_000  # training set size (VAE and UNet)
    vae_steps: int = 700  # Adam steps of each stage
    classifier_steps: int = 300
    unet_steps: int = 2600  # UNet and text encoder, trained together
    output: str = ASSETS  # folder written: toy.safetensors, tokenizer/, classifier.safetensors


def render(shape, color, cx, cy, r):
    """Images [N,3,32,32] in [-1,1]: shape[i] (index into SHAPES) in color[i] centred at (cx, cy),
    on black."""
    # sub-pixel centres, in pixels, and each one's offset from each image's centre
    g = (torch.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    dx = g[None, None, :] - cx[:, None, None]
    dy = g[None, :, None] - cy[:, None, None]
    r = r[:, None, None]

    inside = torch.zeros(len(shape), len(g), len(g), dtype=torch.bool)  # (N, 128, 128)
    for k, is_inside in enumerate(SHAPES.values()):
        inside[shape == k] = is_inside(dx[shape == k], dy[shape == k], r[shape == k])

    # (N, 1, 32, 32): anti-aliased coverage
    cover = F.avg_pool2d(inside[:, None].float(), SUPERSAMPLE)
    rgb = torch.tensor(list(COLORS.values()))[color][:, :, None, None]
    return cover * rgb * 2 - 1


def make_dataset(n, seed):
    """(images [n,3,32,32], shapes [n], colors [n]): random shape, color, size and position; same
    seed, same data."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    color = torch.randint(len(COLORS), (n,), generator=g)
    r = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=g)
    # the whole shape in view
    cx, cy = r + 1 + (IMAGE_SIZE - 2 * r - 2) * torch.rand(2, n, generator=g)

    # rendered in chunks of 2048 images
    chunks = zip(*(t.split(2048) for t in (shape, color, cx, cy, r)))
    images = torch.cat([render(*chunk) for chunk in chunks])
    return images, shape, color


def captions(shape, color, generator):
    """One random caption per image (CAPTION_KINDS): "a red circle", "circle", "a red shape"
    or "", for example."""
    odds = torch.tensor(list(CAPTION_KINDS.values()))
    kinds = torch.multinomial(odds, len(shape), True, generator=generator)
    drop_a = (torch.rand(len(shape), generator=generator) < 0.5).tolist()

    templates = ("a {c} {s}", "a {s}", "a {c} shape", "")
    texts = [
        templates[k].format(c=list(COLORS)[c], s=list(SHAPES)[s])
        for k, s, c in zip(kinds.tolist(), shape.tolist(), color.tolist())
    ]
    # "" stays "": t[2:] of "" is ""
    return [t[2:] if d else t for t, d in zip(texts, drop_a)]


def write_tokenizer(folder):
    """A CLIP BPE tokenizer saved in `folder`: the 256 byte symbols of GPT-2/CLIP's reversible
    table (so any prompt encodes), and each of WORDS as one token, made by merges that join its
    letters left to right."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    # unprintable bytes: 256 + n
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]

    # longest first: "re" of red can't split green
    words = [[*w[:-1], w[-1] + "</w>"] for w in sorted(WORDS, key=len, reverse=True)]
    merges = list(dict.fromkeys(("".join(p[:k]), p[k]) for p in words for k in range(1, len(p))))

    vocab = (
        chars
        + [c + "</w>" for c in chars]
        + [a + b for a, b in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=CLIP_MAX_LEN
    )
    tok.save_pretrained(folder)
    return tok


def classifier_net(width=48):
    """Small CNN judge: images [B,3,32,32] in [-1,1] -> logits [B,8], the shape's 4 then the
    color's 4."""

    def conv(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *conv(3, width),
        nn.MaxPool2d(2),
        *conv(width, 2 * width),
        nn.MaxPool2d(2),
        *conv(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, len(SHAPES) + len(COLORS)),
    )


@torch.no_grad()
def classify(images, classifier=None):
    """(shape index [N], color index [N]) in images [N,3,32,32] by `classifier`, by default the
    shipped one."""
    if classifier is None:
        classifier = classifier_net()
        classifier.load_state_dict(load_file(os.path.join(ASSETS, CLASSIFIER)))
    logits = classifier.eval()(images.float().cpu().clamp(-1, 1))
    shape, color = logits.split([len(SHAPES), len(COLORS)], 1)
    return shape.argmax(1), color.argmax(1)


def fit(model, stage, steps, loss_fn):
    """Adam, linear warm-up then cosine decay to zero (arXiv 1608.03983); loss_fn() gives
    each step's loss."""

    def lr_factor(i):
        warm_up = min(1, (i + 1) / 100)
        return warm_up * (1 + math.cos(math.pi * i / steps)) / 2

    opt = torch.optim.Adam(model.parameters(), LR[stage])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    bar = tqdm(range(steps), stage)
    for _ in bar:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def train_vae(images, config, g):
    """KL autoencoder (LDM sec. 3.1): MSE reconstruction + KL_WEIGHT * KL(q(z|x) || N(0, I))."""
    vae = VAE(VAEConfig(**VAE_CONFIG))

    def loss():
        x = images[torch.randint(len(images), (BATCH["vae"],), generator=g)]
        mean, logvar = vae.encode(x)
        # the reparametrisation trick
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        # Kingma & Welling App. B
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        return F.mse_loss(vae.decode(z), x) + KL_WEIGHT * kl

    vae = fit(vae, "vae", config.vae_steps, loss).requires_grad_(False)
    return standardize(vae, images)


@torch.no_grad()
def standardize(vae, images):
    """Make SD's fixed scaling factor (0.18215; a single file has no other) right for this VAE:
    fold z' = (z - m) / c, c = std(z) * 0.18215 per channel, into quant_conv and
    post_quant_conv. Exact."""
    z = encode(vae, images)
    n = vae.config.latent_channels
    m = z.mean((0, 2, 3))
    c = z.std((0, 2, 3)) * vae.config.scaling_factor

    # quant_conv's first n channels give the mean, the others the log-variance
    q = vae.quant_conv
    q.weight[:n] /= c[:, None, None, None]
    q.bias[:n] = (q.bias[:n] - m) / c
    q.bias[n:] -= 2 * c.log()  # log-variance of z' = that of z - 2 log c

    # post_quant_conv(c z' + m) = (W c) z' + (b + W m)
    p = vae.post_quant_conv
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight *= c[None, :, None, None]
    return vae


@torch.no_grad()
def encode(vae, images):
    """Posterior means [N,4,8,8] of images [N,3,32,32], in chunks."""
    return torch.cat([vae.encode(x)[0] for x in images.split(1024)])


def train_classifier(vae, config, g):
    """Cross-entropy on fresh images every step, half of them through the VAE, so that the
    judge knows its look."""
    model = classifier_net()

    def loss():
        seed = int(torch.randint(2**62, (), generator=g))
        x, s, c = make_dataset(BATCH["classifier"], seed)
        half = len(x) // 2
        with torch.no_grad():
            through_vae = vae.decode(vae.encode(x[half:])[0]).clamp(-1, 1)
        x = torch.cat([x[:half], through_vae])
        shape_logits, color_logits = model(x).split([len(SHAPES), len(COLORS)], 1)
        return F.cross_entropy(shape_logits, s) + F.cross_entropy(color_logits, c)

    return fit(model, "classifier", config.classifier_steps, loss)


def train_unet(latents, shapes, colors, tok, config, g):
    """UNet and text encoder, trained together on DDPM's eps loss (eq. 14, L_simple)."""
    unet = UNet(UNetConfig(**UNET))
    text_config = CLIPTextConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TEXT,
    )
    text = CLIPTextModel(text_config)
    alpha_bar = sampler.alphas_cumprod()

    def loss():
        # a batch of latents and a caption for each
        i = torch.randint(len(latents), (BATCH["unet"],), generator=g)
        texts = captions(shapes[i], colors[i], g)

        # each distinct caption of the batch through the text encoder once
        unique = sorted(set(texts))
        ids = tok(unique, padding="max_length", max_length=CLIP_MAX_LEN, return_tensors="pt")
        context = text(ids.input_ids).last_hidden_state[[unique.index(t) for t in texts]]

        # eq. 4's x_t in eq. 14
        t = torch.randint(sampler.NUM_TRAIN_TIMESTEPS, (len(i),), generator=g)
        eps = torch.randn(latents[i].shape, generator=g)
        a = alpha_bar[t][:, None, None, None]
        x_t = a.sqrt() * latents[i] + (1 - a).sqrt() * eps
        return F.mse_loss(unet(x_t, t, context), eps)

    fit(nn.ModuleList([unet, text]), "unet", config.unet_steps, loss)
    return unet, text


def accuracy(classifier, images, shapes, colors):
    """{"shape": share right, "color": share right} of the classifier on labelled images."""
    s, c = classify(images, classifier)
    return {
        "shape": (s == shapes).float().mean().item(),
        "color": (c == colors).float().mean().item(),
    }


def train(config):
    """All stages (each progress bar shows its time); writes config.output; returns (sd,
    classifier, report)."""
    # initial weights; each stage's data comes from its own generator
    torch.manual_seed(config.seed)
    g = [torch.Generator().manual_seed(config.seed * 100 + k) for k in range(3)]

    # the data, then the stages
    tok = write_tokenizer(os.path.join(config.output, "tokenizer"))
    images, shapes, colors = make_dataset(config.images, config.seed)
    vae = train_vae(images, config, g[0])
    classifier = train_classifier(vae, config, g[1])
    latents = encode(vae, images) * vae.config.scaling_factor
    unet, text = train_unet(latents, shapes, colors, tok, config, g[2])
    sd = load_sd.StableDiffusion(unet, vae, text, tok, "sd1", "epsilon", "toy", IMAGE_SIZE)

    # held out: a seed no stage draws; n seeds of each shape-and-color prompt
    images, shapes, colors = make_dataset(2000, seed=config.seed + 10**6)
    n = 8
    prompts = [(f"a {c} {s}", i, j) for i, s in enumerate(SHAPES) for j, c in enumerate(COLORS)]
    through_vae = sd.vae.decode(encode(vae, images))
    report = {
        "config": dataclasses.asdict(config),
        "classifier_held_out": accuracy(classifier, images, shapes, colors),
        "classifier_held_out_vae": accuracy(classifier, through_vae, shapes, colors),
    }
    generated = sampler.generate(sd, [p[0] for p in prompts], range(n), **SAMPLING)
    labels = torch.tensor([p[1:] for p in prompts]).repeat(n, 1).T
    report["generations"] = accuracy(classifier, generated, *labels)

    checkpoint = os.path.join(config.output, CHECKPOINT)
    load_sd.save_single_file(sd, checkpoint, {"toy": json.dumps(report)})
    save_file(classifier.state_dict(), os.path.join(config.output, CLASSIFIER))
    return sd, classifier, report


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "command", choices=["train"], help="train: all stages (data, VAE, classifier, UNet + text)"
    )
    # typed overrides, e.g. --unet-steps 200 for a quick try
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=f.type,
            default=f.default,
            help=f"(default: {f.default})",
        )
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if k != "command"}
    print(json.dumps(train(TrainConfig(**args))[2], indent=1))


if __name__ == "__main__":
    sys.exit(main())
