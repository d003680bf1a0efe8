"""lora.py: a low-rank update of UNet weights (LoRA, Hu et al. 2021, arXiv 2106.09685, eq. 3),
in the layout kohya's sd-scripts write and A1111, ComfyUI and diffusers' load_lora_weights read.

A selected Linear of weight W [out, in] computes x·(W + (α/r)·B·A)ᵀ, with
A = lora_down [r, in] and B = lora_up [out, r]. A Conv2d (k×k) is LoCon's: A is a k×k conv
with r outputs (its stride and padding), B a 1×1 conv, so B·A is again a k×k kernel. B starts
at zero: the update starts at nothing. The update is added by a forward hook, so the UNet keeps
its modules and names, and switching the hooks off gives the original model back: no copy of W
is needed.
"""

import contextlib
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

# kohya's names: lora_unet_<module path, "." -> "_">.lora_down.weight, .lora_up.weight, .alpha
PREFIX = "lora_unet_"
DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
# The module kinds that take a low-rank update
KINDS = (nn.Linear, nn.Conv2d)
# kohya's metadata: the network code that reads the file, and the base model's version by family
NETWORK_MODULE = "networks.lora"
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def kohya_name(path):
    """kohya's name of the UNet module at `path` (a diffusers name: down_blocks.0.resnets.0...)."""
    return PREFIX + path.replace(".", "_")


def modules_of(unet, selects):
    """{path: module} of the Linear and Conv2d modules whose weight `selects` (a predicate on a
    parameter name, e.g. an esd.FILTERS value) picks."""
    return {
        path: m
        for path, m in unet.named_modules()
        if isinstance(m, KINDS) and selects(f"{path}.weight")
    }


def max_rank(module):
    """The largest rank a low-rank update of `module` can have: its smaller side."""
    w = module.weight
    return min(w.shape[0], w[0].numel())


def attach(unet, selects, rank, alpha=None, generator=None):
    """A LoRA on modules_of(unet, selects); ValueError if there are none or `rank` is larger than
    one of them allows."""
    chosen = modules_of(unet, selects)
    if not chosen:
        raise ValueError("no Linear or Conv2d weights selected for a low-rank update")
    smallest = min(chosen, key=lambda path: max_rank(chosen[path]))
    limit = max_rank(chosen[smallest])
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} is not in 1..{limit} ({smallest} allows at most {limit})")
    return LoRA(chosen, rank, alpha, generator)


def update(down, up):
    """B·A as the weight's own shape: [out, in] or [out, in, k, k]."""
    shape = (up.shape[0], *down.shape[1:])
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


class LoRA:
    """Low-rank updates of the modules `modules` ({path: Linear or Conv2d}), rank r and alpha α,
    added to their outputs by forward hooks while `on`; A drawn from `generator` (uniform in
    ±1/√fan_in, as nn.Linear draws a weight), B zeros.

    params: {kohya name + DOWN or UP: parameter}, in float32 on the modules' device."""

    def __init__(self, modules, rank, alpha=None, generator=None):
        self.rank = rank
        self.alpha = float(alpha or rank)
        self.scale = self.alpha / rank
        self.on = True
        self.modules = modules
        self.params = {}
        self.hooks = []

        for path, m in modules.items():
            w = m.weight
            fan_in = w[0].numel()
            down_shape = (rank, *w.shape[1:])
            up_shape = (w.shape[0], rank, *[1] * (w.dim() - 2))

            # A uniform in ±1/√fan_in, B zeros: B·A = 0 at the start
            down = (torch.rand(down_shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
            up = torch.zeros(up_shape)

            name = kohya_name(path)
            self.params[name + DOWN] = nn.Parameter(down.to(w.device))
            self.params[name + UP] = nn.Parameter(up.to(w.device))
            self.hooks.append(m.register_forward_hook(self.hook(name)))

    def hook(self, name):
        """The forward hook of module `name`: its output plus (α/r)·B(A(x)) while self.on."""
        down = self.params[name + DOWN]
        up = self.params[name + UP]

        def add_update(module, inputs, output):
            if not self.on:
                return output
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                h = F.conv2d(h, up)
            else:
                h = F.linear(F.linear(x, down), up)
            return output + self.scale * h

        return add_update

    @contextlib.contextmanager
    def off(self):
        """Inside the block, the modules compute with their original weights."""
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def remove(self):
        """Take the hooks off: the UNet is as it was before."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def state(self):
        """The kohya file's tensors: A and B (detached, on the CPU) and α of each module."""
        tensors = {k: p.detach().cpu().contiguous() for k, p in self.params.items()}
        for path in self.modules:
            tensors[kohya_name(path) + ALPHA] = torch.tensor(self.alpha)
        return tensors

    @torch.no_grad()
    def load(self, tensors):
        """Copy A and B from `tensors` (a state() of the same modules and rank); ValueError, with
        nothing copied, if one is missing or of another shape."""
        bad = [k for k, p in self.params.items() if k not in tensors or tensors[k].shape != p.shape]
        if bad:
            raise ValueError(f"{len(bad)} LoRA tensors missing or of other shapes, e.g. {bad[0]}")
        for k, p in self.params.items():
            p.copy_(tensors[k])


def metadata(low_rank, family, base_model, steps):
    """kohya's training metadata ("ss_*" strings) of the LoRA `low_rank` of a `family` model:
    what A1111's and ComfyUI's LoRA lists show. Convolutions (LoCon) have the same rank."""
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(low_rank.rank),
        "ss_network_alpha": str(low_rank.alpha),
        "ss_base_model_version": BASE_VERSIONS[family],
        "ss_v2": str(family == "sd2"),
        "ss_sd_model_name": base_model,
        "ss_steps": str(steps),
    }
    if any(isinstance(m, nn.Conv2d) for m in low_rank.modules.values()):
        conv = {"conv_dim": str(low_rank.rank), "conv_alpha": str(low_rank.alpha)}
        meta["ss_network_args"] = json.dumps(conv)
    return meta


def merged(unet, tensors, scale=1.0):
    """{parameter name: W + scale·(α/r)·B·A} of the weights a kohya file's `tensors` update, in
    each weight's dtype; ValueError if a name is no Linear or Conv2d of `unet`, or a shape or value
    does not fit."""
    paths = {kohya_name(path): path for path, m in unet.named_modules() if isinstance(m, KINDS)}
    params = dict(unet.named_parameters())
    names = {k.removesuffix(DOWN) for k in tensors if k.endswith(DOWN)}
    expected = {n + suffix for n in names for suffix in (DOWN, UP, ALPHA)}

    # Every tensor one of a module's three, every module this UNet's
    strays = sorted(set(tensors) - expected) or sorted(expected - set(tensors))
    unknown = sorted(n for n in names if n not in paths)
    if strays or unknown or not names:
        example = (strays + unknown + ["no lora_down weights"])[0]
        raise ValueError(f"not a LoRA file of this UNet's modules, e.g. {example}")

    result = {}
    for n in sorted(names):
        weight = params[paths[n] + ".weight"]
        down = tensors[n + DOWN].float()
        up = tensors[n + UP].float()
        alpha = tensors[n + ALPHA].float()
        rank = down.shape[0]
        fits = down.shape[1:] == weight.shape[1:] and up.shape[:2] == (weight.shape[0], rank)
        if not fits or up[0, 0].numel() != 1 or alpha.numel() != 1:
            raise ValueError(f"{n}: shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit")

        # W + scale·(α/r)·B·A, computed in float32
        change = scale * alpha.item() / rank * update(down, up)
        w = weight.detach().float() + change.to(weight.device)
        if not torch.isfinite(w).all():
            raise ValueError(f"{n}: NaN or infinite values")
        result[paths[n] + ".weight"] = w.to(weight.dtype)
    return result
