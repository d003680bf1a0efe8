"""esd.py: Erased Stable Diffusion (ESD), Gandikota et al., ICCV 2023, arXiv 2303.07345, eq. 6-7.
Fine-tune a UNet so that its prediction for a concept c follows negative guidance: the trained
ε_θ*(x_t, c, t) is pulled toward ε_θ(x_t, t) − η[ε_θ(x_t, c, t) − ε_θ(x_t, t)] of the FROZEN θ.
Official code: train-esd.py (2023, removed in 414dc94) and its rewrite esd_sd.py (2024),
https://github.com/rohitgandikota/erasing/blob/2704f9a28217cedeb7d2f516b9acfc707fd4702a/train-scripts/train-esd.py
https://github.com/rohitgandikota/erasing/blob/ce8d4d925b25f2566fb59458e056af34cd5534d3/esd_sd.py
Memory-lean: ONE UNet; frozen θ = that UNet with kept originals of the trained tensors swapped in."""

import random

import torch
import torch.nn.functional as F
from torch.func import functional_call

import sampler

DDIM_STEPS = (
    50  # x_t trajectory length (train-esd.py --ddim_steps, esd_sd.py --num_inference_steps)
)
GUIDANCE = 3.0  # CFG scale sampling x_t (train-esd.py --start_guidance, esd_sd.py --guidance_scale)
# Which weights sample x_t (value: use the frozen originals?). "trained": the paper and train-esd.py,
# x_t follows the model as it forgets; "frozen": esd_sd.py, x_t never changes (trajectory pools).
XT_FROM = {"trained": False, "frozen": True}

# ESD-u as train-esd.py's "noxattn": all but attn2, the time embedding and the output layers (LDM
# `time_embed`, `out.`), norms included: 598 tensors on SD v1. esd_sd.py's "esd-u" takes the Linear/
# Conv2d modules outside attn2: no norms, but time embedding and conv_out (388; fixtures/README.md).
# SDXL's add_embedding (label_emb) too: a second time embedding, added to temb (esd_sdxl.py's esd-u: all but attn2).
U_EXCLUDED = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")
FILTERS = {  # method -> predicate on a diffusers parameter name
    "esd-x": lambda name: "attn2" in name,  # cross-attention (train-esd.py "xattn")
    "esd-x-strict": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,  # esd_sd.py
    "esd-u": lambda name: "attn2" not in name and not name.startswith(U_EXCLUDED),
    "selfattn": lambda name: "attn1" in name,  # train-esd.py "selfattn"
    "esd-all": lambda name: True,  # train-esd.py "full"
}
METHODS = {  # a line each for --help and the demo: which weights each of FILTERS trains
    "esd-x": "cross-attention (attn2): erases the word",
    "esd-x-strict": "cross-attention keys and values only (attn2.to_k, to_v), as esd_sd.py",
    "esd-u": "all but cross-attention, time embedding and output layers: erases the concept in any context",
    "selfattn": "self-attention (attn1)",
    "esd-all": "every UNet weight",
}


def select(unet, method):
    """{name: parameter} of the tensors that `method` (a FILTERS key) trains."""
    if method not in FILTERS:
        raise ValueError(f"unknown ESD method {method!r}; choose one of: {', '.join(FILTERS)}")
    return {name: p for name, p in unet.named_parameters() if FILTERS[method](name)}


def esd_target(e_0, e_c, negative_guidance, e_a=None):
    """Paper eq. 7 and train-esd.py, from frozen predictions e_0 = ε_θ(x_t, t), e_c = ε_θ(x_t, c, t). With an
    anchor a (esd_sd.py --erase_from) the base is e_a = ε_θ(x_t, a, t) instead of e_0: c is erased from a's
    images. esd_sd.py writes e_c − η'(e_c − e_0) with η' = η + 1: the same target."""
    base = e_0 if e_a is None else e_a
    return base - negative_guidance * (e_c - e_0)  # ε_θ(x_t, t) − η[ε_θ(x_t, c, t) − ε_θ(x_t, t)]


TARGETS = {
    "esd": esd_target
}  # train.py --target NAME; add variants here (README, "Your own target")


class ESD:
    """The UNet being fine-tuned and the originals of the tensors it trains (the frozen θ): only those require grad, in
    their own dtype (fp32: in bf16 most small Adam updates round away); dtype bf16/fp16 only turns on autocast."""

    def __init__(
        self,
        unet,
        method="esd-x",
        *,
        negative_guidance=1.0,
        target="esd",
        steps=DDIM_STEPS,
        guidance=GUIDANCE,
        prediction="epsilon",
        dtype=torch.float32,
    ):
        if target not in TARGETS:
            raise ValueError(f"unknown ESD target {target!r}; choose one of: {', '.join(TARGETS)}")
        self.unet = unet.eval().requires_grad_(False)
        self.params = {name: p.requires_grad_(True) for name, p in select(unet, method).items()}
        self.originals = {name: p.detach().clone() for name, p in self.params.items()}
        self.negative_guidance, self.target = negative_guidance, TARGETS[target]
        self.steps, self.guidance, self.prediction = steps, guidance, prediction
        self.timesteps = sampler.ddim_timesteps(steps)
        self.device = next(
            iter(self.params.values())
        ).device  # move the UNet before, not after, this
        self.autocast = torch.autocast(
            self.device.type, dtype=dtype, enabled=dtype != torch.float32
        )

    def eps(self, x, t, cond, frozen=False):
        """ε(x, t, cond) with the weights being trained, or (frozen=True) with the originals; cond: a conditioning
        (sampler.py: a text context, or SDXL's (context, added))."""
        swapped = (
            self.originals if frozen else {}
        )  # frozen: the same module, the originals in place of the trained
        return functional_call(self.unet, swapped, (x, t, *sampler.inputs(cond)))

    @torch.no_grad()
    def sample(self, x_T, cond, uncond, until, xt_from="trained", trajectory=False):
        """x after `until` guided DDIM steps from noise x_T: it sits at timestep self.timesteps[until].
        trajectory=True: every step's x up to there, [until + 1, B, 4, h, w]."""
        with self.autocast:
            return sampler.sample(
                lambda x, t, *c: self.eps(x, t, c, XT_FROM[xt_from]),
                x_T,
                cond,
                uncond,
                steps=self.steps,
                guidance=self.guidance,
                prediction=self.prediction,
                until=until,
                trajectory=trajectory,
            )

    def loss(self, x_t, t_enc, cond, uncond, anchor=None):
        """MSE between the trained ε_θ*(x_t, c, t) and the target from the frozen θ; x_t [B, 4, h, w], conditionings
        (sampler.py) cond of batch B, uncond and anchor of batch 1. With an anchor a the trained model is asked on
        a's prompt (x_t should show a's images): c is erased from them."""
        # The timestep x_t sits at. train-esd.py instead draws a DDPM t from [t_enc, t_enc + 1) * 1000/steps,
        # but its sampler stops where x is 2-3 DDIM steps less noisy than that t says.
        n = len(x_t)
        t = self.timesteps[t_enc].expand(
            n
        )  # t_enc: one for the batch, or a LongTensor of one per row
        contexts = [sampler.cat([uncond] * n), cond] + (
            [sampler.cat([anchor] * n)] if anchor is not None else []
        )
        with torch.no_grad(), self.autocast:  # frozen θ, ONE batch: [e_0; e_c] (+ e_a)
            e = self.eps(
                torch.cat([x_t] * len(contexts)),
                t.repeat(len(contexts)),
                sampler.cat(contexts),
                frozen=True,
            )
        e_0, e_c, *e_a = e.float().chunk(len(contexts))
        target = self.target(e_0, e_c, self.negative_guidance, *e_a)
        with self.autocast:
            e_n = self.eps(
                x_t, t, contexts[-1] if anchor is not None else cond
            )  # trained θ*, with grad
        return F.mse_loss(e_n.float(), target)

    def delta(self):
        """{name: tensor} of the trained tensors, detached, on the CPU: a delta file's content."""
        return {name: p.detach().cpu().contiguous() for name, p in self.params.items()}


class XtSource:
    """Where each iteration's x_t comes from: draw(it) -> (concept index per row, t_enc, x_t [B, 4, h, w]); concept,
    t_enc and noise depend on (seed, it) alone, so a resumed run repeats an uninterrupted one. prompts: one conditioning
    (batch 1) per concept to sample x_t with (with an anchor: its). pool=0, the paper: each iteration samples B fresh
    x_t, t_enc guided DDIM steps from noise. pool=N: N trajectories (every step's x, DESIGN.md "Where x_t costs most")
    sampled in one batch, rebuilt every `refresh` iterations (0: never); iteration it reads entries it*B .. it*B+B-1
    (mod N) at its t_enc."""

    def __init__(
        self,
        trainer,
        prompts,
        uncond,
        latent_shape,
        *,
        seed=0,
        batch_size=1,
        pool=0,
        refresh=0,
        xt_from="trained",
    ):
        self.trainer, self.prompts, self.uncond, self.shape = trainer, prompts, uncond, latent_shape
        self.seed, self.batch_size, self.pool, self.refresh, self.xt_from = (
            seed,
            batch_size,
            pool,
            refresh,
            xt_from,
        )
        self.concepts, self.paths, self.built = (
            [],
            None,
            None,
        )  # the pool: a concept and a trajectory per entry

    def _draw(self, stream, i):
        """(concept index, t_enc, noise seed) number i of a stream: e.g. iteration it, or pool entry i."""
        rng = random.Random(f"{self.seed}/{stream}/{i}")
        noise_seed = rng.getrandbits(62)
        return rng.randrange(len(self.prompts)), rng.randrange(self.trainer.steps), noise_seed

    def _sample(self, concepts, noise_seeds, n, until, trajectory=False):
        """x_t (or the trajectory) of n noises per seed (noise[:1] is the same for every n), each seed its concept's
        prompt, all in one batch."""
        x_T = torch.cat(
            [
                torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(s))
                for s in noise_seeds
            ]
        )
        cond = sampler.cat([self.prompts[c] for c in concepts for _ in range(n)])
        return self.trainer.sample(
            x_T.to(self.trainer.device),
            cond,
            sampler.cat([self.uncond] * len(x_T)),
            until,
            self.xt_from,
            trajectory,
        )

    def draw(self, it):
        concept, t_enc, noise_seed = self._draw("iteration", it)
        if not self.pool:
            return (
                [concept] * self.batch_size,
                t_enc,
                self._sample([concept], [noise_seed], self.batch_size, t_enc),
            )
        generation = it // self.refresh if self.refresh else 0
        if (
            generation != self.built
        ):  # (re)build, one batch up to the last t_enc this generation serves
            served = range(generation * self.refresh, (generation + 1) * self.refresh)
            last = max(
                (self._draw("iteration", i)[1] for i in served), default=self.trainer.steps - 1
            )
            concepts, _, seeds = zip(
                *[self._draw(f"pool{generation}", i) for i in range(self.pool)]
            )
            self.concepts, self.built = list(concepts), generation
            self.paths = self._sample(
                concepts, seeds, 1, last, trajectory=True
            )  # [last + 1, N, 4, h, w]
        rows = [(it * self.batch_size + j) % self.pool for j in range(self.batch_size)]
        return [self.concepts[i] for i in rows], t_enc, self.paths[t_enc, rows]

    def state(self):
        """The pool being read, for --resume: an on-policy pool was sampled by earlier weights than the checkpoint's."""
        return {"built": self.built, "concepts": self.concepts, "paths": self.paths}

    def restore(self, state):
        self.built, self.concepts = state["built"], state["concepts"]
        self.paths = None if state["paths"] is None else state["paths"].to(self.trainer.device)
