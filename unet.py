"""Stable Diffusion's denoising UNet eps_theta(x_t, t, c) in plain PyTorch: SD v1, v2 and XL.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752:
Sec. 3.3 (conditioning by cross-attention inside the UNet); attention and the sinusoidal timestep
embedding are Vaswani et al. arXiv:1706.03762 eq. 1 and Sec. 3.5. SDXL (Podell et al.,
arXiv:2307.01952, Sec. 2.1-2.2): deeper transformers, no attention at the first level, image size
and crop conditioning. Attribute names equal diffusers' UNet2DConditionModel, so its state dicts
load with strict=True:
huggingface/diffusers@dbbfe89b9297 src/diffusers/models/unets/unet_2d_condition.py
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MAX_PERIOD = 10_000  # timestep_embedding(max_period=10000) in LDM openaimodel.py
TIME_EMBED_MULT = 4  # time_embed_dim = model_channels * 4 (LDM UNetModel)
FF_MULT = 4  # FeedForward(mult=4) in LDM attention.py
RESNET_EPS = 1e-5  # UNet GroupNorms: torch's default eps (LDM GroupNorm32, diffusers norm_eps)
TRANSFORMER_GN_EPS = 1e-6  # GroupNorm before proj_in: LDM Normalize(eps=1e-6)
CROSS_DOWN = "CrossAttnDownBlock2D"
CROSS_UP = "CrossAttnUpBlock2D"
# SDXL's size numbers: original (height, width), crop (top, left), target (height, width)
# (sgm's conditioner embedders 2-4, diffusers' time_ids)
SIZE_NUMBERS = 6


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    cross_attention_dim: int = 768  # width of the text encoder's hidden states
    attention_head_dim: int | tuple = 8  # a head COUNT (diffusers' misnomer), shared or per level
    # proj_in/proj_out: Linear (SD v2) instead of 1x1 conv (SD v1)
    use_linear_projection: bool = False
    transformer_layers_per_block: int | tuple = 1  # transformer blocks per attention, or per level
    norm_num_groups: int = 32
    sample_size: int = 64  # latent side of the training resolution (512 px / 8)
    # "text_time": SDXL's pooled text + size numbers (forward's `added`)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # d: sinusoidal width of each size number
    # add_embedding's input: pooled text P + SIZE_NUMBERS x d
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def sd1(cls):
        """SD v1.x: v1-inference.yaml unet_config (model_channels 320, channel_mult [1,2,4,4], 2 res
        blocks, num_heads 8, context_dim 768) = stable-diffusion-v1-5 unet/config.json."""
        return cls()

    @classmethod
    def sd2(cls):
        """SD v2.x: v2-inference-v.yaml: num_head_channels 64 (so 320/64=5, 10, 20, 20 heads),
        context_dim 1024 (OpenCLIP ViT-H), use_linear_in_transformer; 768 px, so 96 latents."""
        return cls(
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            sample_size=96,
        )

    @classmethod
    def sdxl(cls):
        """SDXL base 1.0: Stability-AI/generative-models@45c443b
        configs/inference/sd_xl_base.yaml network_config (model_channels 320, channel_mult
        [1, 2, 4], attention_resolutions [4, 2]: none at the first level, transformer_depth
        [1, 2, 10] (the first unused), num_head_channels 64, context_dim 2048 = CLIP-L 768 +
        bigG 1280, adm_in_channels 2816 = pooled bigG 1280 + 6 x 256) = the base model's
        unet/config.json; 1024 px."""
        return cls(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", CROSS_DOWN, CROSS_DOWN),
            up_block_types=(CROSS_UP, CROSS_UP, "UpBlock2D"),
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10),
            sample_size=128,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


def per_level(value, levels):
    """A config value given once for all levels, or per level, as a list per level."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def mlp(dim_in, dim):
    """Linear, SiLU, Linear: diffusers' TimestepEmbedding (LDM's time_embed, label_emb)."""
    layers = OrderedDict(
        linear_1=nn.Linear(dim_in, dim),
        act=nn.SiLU(),
        linear_2=nn.Linear(dim, dim),
    )
    return nn.Sequential(layers)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of [B] timesteps, cos half first (flip_sin_to_cos, freq_shift 0)."""
    half = dim // 2
    # 10000^(-i / half)
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention softmax(QK^T / sqrt(d)) V (LDM Sec. 3.3), with Q from x and K, V from
    `context` (cross-attention, attn2) or from x itself when context is None (attn1)."""

    def __init__(self, query_dim, heads, head_dim, context_dim=None, bias=False):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        # A list so the Linear keeps the checkpoints' positional name to_out.0 (slot 1 held a
        # Dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def split_heads(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, x, context=None):
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))

        out = F.scaled_dot_product_attention(q, k, v)  # Vaswani eq. 1, scale 1/sqrt(d)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, heads * d)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer arXiv:2002.05202 Sec. 2): one projection gives the value and the gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        # Positional slots as in the checkpoints (net.0.proj, net.2): slot 1 held a Dropout.
        self.net = nn.Sequential(
            GEGLU(dim, FF_MULT * dim),
            nn.Identity(),
            nn.Linear(FF_MULT * dim, dim),
        )

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """LDM's SpatialTransformer: feature map -> HW tokens -> transformer blocks -> back, +x."""

    def __init__(self, channels, heads, context_dim, linear, groups, layers=1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GN_EPS)
        proj = nn.Linear if linear else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = proj(channels, channels)
        self.proj_out = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(layers)]
        )

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)

        # A 1x1 conv (SD v1) and a Linear (SD v2) are the same matrix on tokens: one path for both.
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)

        return x + h.transpose(1, 2).reshape(B, C, H, W)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding (none in the VAE) added between; +x."""

    def __init__(self, in_ch, out_ch, temb_ch=None, groups=32, eps=RESNET_EPS):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))

        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 all round; LDM's VAE pads (0, 1, 0, 1), right and bottom
    only, which Conv2d's `padding` cannot express, so that `pad` is applied explicitly."""

    def __init__(self, channels, pad=None):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if pad else 1)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad) if self.pad else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`, the skip's size when a side was odd), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        scale = None if size else 2.0
        return self.conv(F.interpolate(x, size=size, scale_factor=scale, mode="nearest"))


class DownBlock2D(nn.Module):
    """One level of the contracting path: resnets (each followed by its attention when the level
    has any), then an optional downsampler. Returns x and every intermediate output as skips."""

    def __init__(self, resnets, attentions=(), downsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsamplers = nn.ModuleList([downsample] if downsample is not None else [])

    def forward(self, x, temb=None, context=None):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = self.attentions[j](x, context) if self.attentions else x
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            # the up path also consumes the downsampled map
            skips.append(x)
        return x, skips


class MidBlock2D(nn.Module):
    """resnet, then (attention, resnet) pairs at the lowest resolution."""

    def __init__(self, resnets, attentions):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock2D(nn.Module):
    """One level of the expanding path: each resnet first concatenates the matching skip (if any,
    the VAE decoder has none), then attention when the level has any; an optional upsampler."""

    def __init__(self, resnets, attentions=(), upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([upsample] if upsample is not None else [])

    def forward(self, x, temb=None, context=None, skips=(), size=None):
        skips = list(skips)
        for j, resnet in enumerate(self.resnets):
            # the last skip first
            x = resnet(torch.cat([x, skips.pop()], dim=1) if skips else x, temb)
            x = self.attentions[j](x, context) if self.attentions else x
        for up in self.upsamplers:
            x = up(x, size)
        return x


class UNet(nn.Module):
    """eps (or v) = UNet(x_t [B,4,h,w], t, context [B,77,D], added=None). Set
    `gradient_checkpointing = True` to recompute each down/mid/up block in the backward pass
    instead of storing its activations.

    SDXL (addition_embed_type "text_time") also needs `added` [B, P + 6]: the pooled text
    embedding [B, P], then the SIZE_NUMBERS in pixels. ONE tensor per prompt, batched like
    `context`: what combines contexts (torch.cat of [uncond; cond], expand, chunk) combines `added`
    the same way, and a frozen call passes it on as one more argument,
    functional_call(unet, originals, (x, t, context, added)). SD v1/v2: None."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        c = config
        ch = list(config.block_out_channels)
        lpb = config.layers_per_block
        n = len(ch)
        heads = per_level(c.attention_head_dim, n)
        depth = per_level(c.transformer_layers_per_block, n)
        temb = ch[0] * TIME_EMBED_MULT
        resnet = partial(ResnetBlock2D, temb_ch=temb, groups=c.norm_num_groups)

        def attentions(level, count):
            """A level's `count` transformers: its channels, heads and depth."""
            return [
                Transformer2DModel(
                    ch[level],
                    heads[level],
                    c.cross_attention_dim,
                    c.use_linear_projection,
                    c.norm_num_groups,
                    depth[level],
                )
                for _ in range(count)
            ]

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)

        # on the sinusoidal embedding of t
        self.time_embedding = mlp(ch[0], temb)

        # SDXL: on [pooled text, the size numbers' sinusoidal embeddings] (LDM label_emb), added
        # to the time's
        self.add_embedding = None
        if c.addition_embed_type:
            self.add_embedding = mlp(c.projection_class_embeddings_input_dim, temb)

        # Registered in this order (down, up, mid), as state dicts and parameters() list them
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()

        # The contracting path; skip_ch: channels of every tensor it stores for the up path
        skip_ch = [ch[0]]
        for i, kind in enumerate(c.down_block_types):
            last = i == n - 1
            resnets = [resnet(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i]) for j in range(lpb)]
            block = DownBlock2D(
                resnets,
                attentions(i, lpb) if kind == CROSS_DOWN else [],
                None if last else Downsample2D(ch[i]),
            )
            self.down_blocks.append(block)
            skip_ch += [ch[i]] * (lpb + (not last))

        self.mid_block = MidBlock2D(
            [resnet(ch[-1], ch[-1]), resnet(ch[-1], ch[-1])],
            attentions(n - 1, 1),
        )

        # The expanding path: one resnet more per level than going down, for the downsampler's
        # skip
        x_ch = ch[-1]
        for i, kind in enumerate(c.up_block_types):
            level = n - 1 - i
            resnets = []
            for _ in range(lpb + 1):
                resnets.append(resnet(x_ch + skip_ch.pop(), ch[level]))
                x_ch = ch[level]
            block = UpBlock2D(
                resnets,
                attentions(level, len(resnets)) if kind == CROSS_UP else [],
                Upsample2D(ch[level]) if level > 0 else None,
            )
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, x, t, context, added=None):
        # the time embedding: t a number, 0-dim or [B] -> [B]
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        t_features = timestep_embedding(t, self.conv_in.out_channels).to(x.dtype)
        temb = self.time_embedding(t_features)

        # SDXL's added conditioning
        if (added is None) != (self.add_embedding is None):
            needs = "needs" if added is None else "takes no"
            raise ValueError(
                f"this UNet (addition_embed_type {self.config.addition_embed_type}) "
                f"{needs} `added` conditioning"
            )
        if added is not None:
            temb = temb + self.add_embedding(self.added_features(added).to(x.dtype))

        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        run = partial(checkpoint, use_reentrant=False) if checkpointing else nn.Module.__call__

        # down, keeping every output for the up path
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, out = run(block, x, temb, context)
            skips += out

        x = run(self.mid_block, x, temb, context)

        # up, each block taking its resnets' number of skips, last first
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, used = skips[:-n], skips[-n:]
            # upsample to the next level's skip size
            size = skips[-1].shape[-2:] if skips else None
            x = run(block, x, temb, context, used, size)

        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def added_features(self, added):
        """[B, P + 6] pooled text and the SIZE_NUMBERS -> [B, P + 6 d]: the pooled embedding, then
        each number's sinusoidal embedding of width d = addition_time_embed_dim (as a timestep's),
        add_embedding's input (sgm's vector `y`)."""
        d = self.config.addition_time_embed_dim
        pooled = added[:, :-SIZE_NUMBERS]
        numbers = added[:, -SIZE_NUMBERS:]
        embedded = timestep_embedding(numbers.flatten(), d)  # [B * 6, d]
        return torch.cat([pooled, embedded.view(len(added), SIZE_NUMBERS * d)], dim=-1)
