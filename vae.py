"""Stable Diffusion's KL autoencoder: images <-> latents 8x smaller, 4 channels (LDM "first stage").

Rombach et al. arXiv:2112.10752 Sec. 3.1 (perceptual compression with a KL-regularised latent);
the posterior is a diagonal Gaussian (mean, logvar), Kingma & Welling arXiv:1312.6114. Built from
unet.py's blocks; attribute names equal diffusers' AutoencoderKL, so its state dicts load strictly:
huggingface/diffusers@9578d7e80409 src/diffusers/models/autoencoders/vae.py
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from unet import (
    Attention,
    DownBlock2D,
    Downsample2D,
    MidBlock2D,
    ResnetBlock2D,
    UpBlock2D,
    Upsample2D,
)

VAE_EPS = 1e-6  # every VAE GroupNorm: LDM Normalize(eps=1e-6)
VAE_SCALE = 0.18215  # latent scaling: v1-inference.yaml `scale_factor`
# SDXL's (sd_xl_base.yaml `scale_factor`): the same VAE architecture, retrained
VAE_SCALE_XL = 0.13025
# the clamp in LDM's DiagonalGaussianDistribution
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
VAE_PAD = (0, 1, 0, 1)  # LDM Downsample pads right and bottom, then a stride-2 conv


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = VAE_SCALE

    @classmethod
    def sd(cls):
        """SD v1 and v2: v1-inference.yaml first_stage_config (ch 128, ch_mult [1,2,4,4],
        num_res_blocks 2, z_channels 4), as in stable-diffusion-v1-5 vae/config.json."""
        return cls()

    @classmethod
    def sdxl(cls):
        """SDXL base 1.0 (its vae/config.json): the same layout, its own weights and scaling,
        trained at 1024 px."""
        return cls(sample_size=1024, scaling_factor=VAE_SCALE_XL)


class VAEAttention(Attention):
    """Single-head self-attention over the pixels of the lowest-resolution map, with its own
    GroupNorm and a residual (LDM AttnBlock: q/k/v/proj_out were 1x1 convs, i.e. Linears)."""

    def __init__(self, channels, groups):
        super().__init__(channels, heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=VAE_EPS)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = super().forward(self.group_norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def mid_block(ch, groups):
    """resnet, attention, resnet at the lowest resolution."""
    resnets = [ResnetBlock2D(ch, ch, groups=groups, eps=VAE_EPS) for _ in range(2)]
    return MidBlock2D(resnets, [VAEAttention(ch, groups)])


class Encoder(nn.Module):
    """Image [B,3,H,W] -> 2 * latent channels (mean and logvar) at H/8 x W/8."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.block_out_channels
        g = c.norm_num_groups
        n = len(ch)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        for i in range(n):
            resnets = [
                ResnetBlock2D(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], groups=g, eps=VAE_EPS)
                for j in range(c.layers_per_block)
            ]
            downsample = Downsample2D(ch[i], VAE_PAD) if i < n - 1 else None
            self.down_blocks.append(DownBlock2D(resnets, downsample=downsample))

        self.mid_block = mid_block(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=VAE_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)  # no skips: the autoencoder is not a U-Net
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent [B,4,h,w] -> image [B,3,8h,8w] in about [-1, 1]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.block_out_channels[::-1]  # widest first
        g = c.norm_num_groups
        n = len(ch)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = mid_block(ch[0], g)

        self.up_blocks = nn.ModuleList()
        for i in range(n):
            resnets = [
                ResnetBlock2D(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], groups=g, eps=VAE_EPS)
                for j in range(c.layers_per_block + 1)
            ]
            upsample = Upsample2D(ch[i]) if i < n - 1 else None
            self.up_blocks.append(UpBlock2D(resnets, upsample=upsample))

        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=VAE_EPS)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """encode(x) -> (mean, logvar) of q(z|x); decode(z) -> image, for an UNSCALED latent z
    (the caller divides the diffusion latent by config.scaling_factor first)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1)
        self.post_quant_conv = nn.Conv2d(lat, lat, 1)

    @property
    def scale_factor(self):
        """Image pixels per latent pixel along a side: one downsampler per level but the last."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))
