"""esd.py: Erased Stable Diffusion (ESD), Gandikota et al., ICCV 2023, arXiv 2303.07345, eq. 6-7.
Fine-tune a UNet so that its prediction for a concept c follows negative guidance: the trained
ε_θ*(x_t, c, t) is pulled toward ε_θ(x_t, t) − η[ε_θ(x_t, c, t) − ε_θ(x_t, t)] of the FROZEN θ.
Official code: train-esd.py (2023, removed in 414dc94) and its rewrite esd_sd.py (2024),
https://github.com/rohitgandikota/erasing/blob/2704f9a28217cedeb7d2f516b9acfc707fd4702a/train-scripts/train-esd.py
https://github.com/rohitgandikota/erasing/blob/ce8d4d925b25f2566fb59458e056af34cd5534d3/esd_sd.py
Memory-lean: ONE UNet; frozen θ = that UNet with kept originals of the trained tensors swapped in.
"""
import torch
import torch.nn.functional as F
from torch.func import functional_call

import sampler

DDIM_STEPS = 50  # x_t trajectory length (train-esd.py --ddim_steps, esd_sd.py --num_inference_steps)
START_GUIDANCE = 3.0  # CFG scale sampling x_t (train-esd.py --start_guidance, esd_sd.py --guidance_scale)
# Which weights sample x_t (value: use the frozen originals?). "trained": the paper and train-esd.py,
# x_t follows the model as it forgets; "frozen": esd_sd.py, x_t never changes (trajectory pools).
XT_FROM = {"trained": False, "frozen": True}

# ESD-u as train-esd.py's "noxattn": all but attn2, the time embedding and the output layers (LDM
# `time_embed`, `out.`), norms included: 598 tensors on SD v1. esd_sd.py's "esd-u" takes the Linear/
# Conv2d modules outside attn2: no norms, but time embedding and conv_out (388; fixtures/README.md).
U_EXCLUDED = ("time_embedding.", "conv_norm_out.", "conv_out.")
FILTERS = {  # method -> predicate on a diffusers parameter name
    "esd-x": lambda name: "attn2" in name,  # cross-attention (train-esd.py "xattn")
    "esd-x-strict": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,  # esd_sd.py
    "esd-u": lambda name: "attn2" not in name and not name.startswith(U_EXCLUDED),
    "selfattn": lambda name: "attn1" in name,  # train-esd.py "selfattn"
    "esd-all": lambda name: True,  # train-esd.py "full"
}


def select(unet, method):
    """{name: parameter} of the tensors that `method` (a FILTERS key) trains."""
    if method not in FILTERS:
        raise ValueError(f"unknown ESD method {method!r}; choose one of: {', '.join(FILTERS)}")
    return {name: p for name, p in unet.named_parameters() if FILTERS[method](name)}


# Targets from frozen predictions e_0 = ε_θ(x_t, t), e_c = ε_θ(x_t, c, t), e_a = ε_θ(x_t, a, t); eta = η.
def esd_target(e_0, e_c, eta, e_a=None):
    """Paper, train-esd.py. esd_sd.py writes e_c − η'(e_c − e_0), η' = η + 1: the same target."""
    return e_0 - eta * (e_c - e_0)  # eq. 7: ε_θ(x_t, t) − η[ε_θ(x_t, c, t) − ε_θ(x_t, t)]


def anchor_target(e_0, e_c, eta, e_a):
    """esd_sd.py --erase_from a: start from a's prediction (esd_sd.py puts its η' = 2 here)."""
    return e_a - eta * (e_c - e_0)  # eq. 7 with ε_θ(x_t, a, t) in place of ε_θ(x_t, t)


TARGETS = {"esd": esd_target, "anchor": anchor_target}


class ESD:
    """A UNet being fine-tuned plus the original values of the tensors it trains (the frozen θ).
    Only those tensors require grad; they keep their dtype (fp32: in bf16 most small Adam updates
    round away). dtype bf16/fp16 only turns on autocast for the forward passes."""

    def __init__(self, unet, method="esd-x", *, negative_guidance=1.0, target="esd", steps=DDIM_STEPS,
                 guidance=START_GUIDANCE, prediction="epsilon", dtype=torch.float32):
        if target not in TARGETS:
            raise ValueError(f"unknown ESD target {target!r}; choose one of: {', '.join(TARGETS)}")
        self.unet = unet.eval().requires_grad_(False)
        self.params = {name: p.requires_grad_(True) for name, p in select(unet, method).items()}
        self.originals = {name: p.detach().clone() for name, p in self.params.items()}
        self.eta, self.target, self.steps, self.guidance, self.prediction = negative_guidance, target, steps, guidance, prediction
        self.timesteps = sampler.ddim_timesteps(steps)
        device = next(iter(self.params.values())).device  # move the UNet before, not after, this
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def eps(self, x, t, context, frozen=False):
        """ε(x, t, context) with the weights being trained, or (frozen=True) with the originals."""
        if frozen:  # the same module, the kept originals in place of the trained tensors
            return functional_call(self.unet, self.originals, (x, t, context))
        return self.unet(x, t, context)

    @torch.no_grad()
    def x_t(self, x_T, cond, uncond, t_enc, xt_from="trained"):
        """x after t_enc guided DDIM steps from noise x_T: it sits at timestep self.timesteps[t_enc]."""
        with self.autocast:
            return sampler.sample(lambda x, t, c: self.eps(x, t, c, XT_FROM[xt_from]), x_T, cond, uncond,
                                  steps=self.steps, guidance=self.guidance, prediction=self.prediction,
                                  until=t_enc)

    @torch.no_grad()
    def trajectory(self, x_T, cond, uncond, xt_from="frozen"):
        """[steps, B, 4, h, w]: x at every DDIM step, trajectory[t_enc] == x_t(x_T, ..., t_enc). A pool of
        these from the frozen model gives every later x_t for free (DESIGN.md "Where x_t costs most");
        rebuilt from the trained model every R iterations, it nears on-policy x_t."""
        xs = []

        def recording(x, t, context):  # the sampler calls the model once per step, on [x; x] under CFG
            xs.append(x[:len(x_T)])
            return self.eps(x, t, context, XT_FROM[xt_from])
        with self.autocast:
            sampler.sample(recording, x_T, cond, uncond, steps=self.steps, guidance=self.guidance,
                           prediction=self.prediction)
        return torch.stack(xs)

    def loss(self, x_t, t_enc, cond, uncond, anchor=None):
        """MSE between the trained ε_θ*(x_t, c, t) and the target from the frozen θ. With an anchor a
        (target "anchor", esd_sd.py --erase_from) x_t should come from a's prompt, and the trained
        model is asked on a's prompt: c is erased from a's images."""
        if (anchor is not None) != (self.target == "anchor"):
            raise ValueError("an anchor prompt is used by, and needed for, the 'anchor' target only")
        # The timestep x_t sits at. train-esd.py instead draws a DDPM t from [t_enc, t_enc + 1) * 1000/steps,
        # but its sampler stops where x is 2-3 DDIM steps less noisy than that t says.
        t = int(self.timesteps[t_enc])
        contexts = [uncond, cond] + ([anchor] if anchor is not None else [])
        with torch.no_grad(), self.autocast:  # frozen θ, ONE batch: [e_0; e_c] (+ e_a)
            e = self.eps(torch.cat([x_t] * len(contexts)), t, torch.cat(contexts), frozen=True).float()
        e_0, e_c, *e_a = e.chunk(len(contexts))
        target = TARGETS[self.target](e_0, e_c, self.eta, *e_a)
        with self.autocast:
            e_n = self.eps(x_t, t, cond if anchor is None else anchor)  # trained θ*, with grad
        return F.mse_loss(e_n.float(), target)


def delta_state_dict(unet, method):
    """{name: tensor} of `method`'s tensors of `unet`, detached, on the CPU: a delta file's content."""
    return {name: p.detach().cpu().contiguous() for name, p in select(unet, method).items()}
