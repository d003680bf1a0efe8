"""esd.py: Erased Stable Diffusion (ESD), Gandikota et al., ICCV 2023, arXiv 2303.07345, eq. 6-7.

Fine-tune a UNet so that its prediction for a concept c follows negative guidance: the trained
ε_θ*(x_t, c, t) is pulled toward e_0 − η(e_c − e_0), where e_0 = ε_θ(x_t, t) and
e_c = ε_θ(x_t, c, t) come from the FROZEN θ. Read in order: which weights train (FILTERS), the
target (TARGETS), the trainer (ESD), and where x_t comes from (PaperXt, then TrajectoryPool).

Official code: train-esd.py (2023, removed in 414dc94) and its rewrite esd_sd.py (2024):
rohitgandikota/erasing@2704f9a28217 train-scripts/train-esd.py
rohitgandikota/erasing@ce8d4d925b25 esd_sd.py
"""

import contextlib
import random

import torch
import torch.nn.functional as F
from torch.func import functional_call

import lora
import sampler

# Length of the x_t trajectories (train-esd.py --ddim_steps, esd_sd.py --num_inference_steps)
DDIM_STEPS = 50
# CFG scale while sampling x_t (train-esd.py --start_guidance, esd_sd.py --guidance_scale)
GUIDANCE = 3.0
# Which weights sample x_t (value: use the frozen originals?). "trained": the paper and
# train-esd.py, x_t follows the model as it forgets; "frozen": esd_sd.py, x_t never changes.
XT_FROM = {"trained": False, "frozen": True}


# ESD-u as train-esd.py's "noxattn": all but attn2, the time embedding and the output layers (LDM
# `time_embed`, `out.`), norms included: 598 tensors on SD v1. esd_sd.py's "esd-u" takes the
# Linear/Conv2d modules outside attn2: no norms, but the time embedding and conv_out (388 tensors;
# tests/fixtures/README.md). SDXL's add_embedding (label_emb) is left out too: a second time
# embedding, added to temb (esd_sdxl.py's esd-u trains all but attn2).
U_EXCLUDED = ("time_embedding.", "add_embedding.", "conv_norm_out.", "conv_out.")

# method -> predicate on a diffusers parameter name: True for the tensors the method trains
FILTERS = {
    # cross-attention (train-esd.py "xattn")
    "esd-x": lambda name: "attn2" in name,
    # cross-attention keys and values only (esd_sd.py)
    "esd-x-strict": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
    "esd-u": lambda name: "attn2" not in name and not name.startswith(U_EXCLUDED),
    # train-esd.py "selfattn"
    "selfattn": lambda name: "attn1" in name,
    # train-esd.py "full"
    "esd-all": lambda name: True,
}

# A line each for --help and the demo: which weights each of FILTERS trains
METHODS = {
    "esd-x": "cross-attention (attn2): erases the word",
    "esd-x-strict": "cross-attention keys and values only (attn2.to_k, to_v), as esd_sd.py",
    "esd-u": "all but cross-attention, time embedding and output layers: "
    "erases the concept in any context",
    "selfattn": "self-attention (attn1)",
    "esd-all": "every UNet weight",
}


def select(unet, method):
    """{name: parameter} of the tensors that `method` (a FILTERS key) trains."""
    if method not in FILTERS:
        raise ValueError(f"unknown ESD method {method!r}; choose one of: {', '.join(FILTERS)}")
    return {name: p for name, p in unet.named_parameters() if FILTERS[method](name)}


def esd_target(e_0, e_c, negative_guidance, e_a=None):
    """Paper eq. 7 and train-esd.py, from the frozen predictions e_0 = ε_θ(x_t, t) and
    e_c = ε_θ(x_t, c, t). With an anchor a (esd_sd.py --erase_from) the base is
    e_a = ε_θ(x_t, a, t) instead of e_0: c is erased from a's images. esd_sd.py writes
    e_c − η'(e_c − e_0) with η' = η + 1: the same target."""
    base = e_0 if e_a is None else e_a
    # ε_θ(x_t, t) − η[ε_θ(x_t, c, t) − ε_θ(x_t, t)]
    return base - negative_guidance * (e_c - e_0)


# train.py --target NAME; add variants here (docs/cli.md, "Your own target")
TARGETS = {"esd": esd_target}


class ESD:
    """The UNet being fine-tuned and the originals of the tensors it trains (the frozen θ).

    Memory-lean (docs/design.md, "Memory-lean ESD"): ONE UNet; the frozen θ is that same UNet
    with the kept originals of the trained tensors swapped in by functional_call. Only the
    trained tensors require grad, in their own dtype (fp32: in bf16 most small Adam updates round
    away); dtype bf16/fp16 only turns on autocast.

    rank > 0: instead of the selected weights, a low-rank update (lora.py, rank and alpha) of the
    Linear and Conv2d modules whose weights the method selects trains; the frozen θ is the same
    UNet with the update switched off, so no originals are kept. ValueError for a rank larger
    than a selected module allows."""

    def __init__(
        self,
        unet,
        method="esd-x",
        *,
        rank=0,
        alpha=None,
        negative_guidance=1.0,
        target="esd",
        steps=DDIM_STEPS,
        guidance=GUIDANCE,
        prediction="epsilon",
        dtype=torch.float32,
    ):
        if target not in TARGETS:
            raise ValueError(f"unknown ESD target {target!r}; choose one of: {', '.join(TARGETS)}")

        # The trained tensors, and their original values: the frozen θ
        self.unet = unet.eval().requires_grad_(False)
        selected = select(unet, method)
        self.lora = None
        if rank:
            # A drawn from a fixed seed
            generator = torch.Generator().manual_seed(0)
            self.lora = lora.attach(unet, lambda name: name in selected, rank, alpha, generator)
            self.params = self.lora.params
            self.originals = {}
        else:
            self.params = {name: p.requires_grad_(True) for name, p in selected.items()}
            self.originals = {name: p.detach().clone() for name, p in self.params.items()}

        self.negative_guidance = negative_guidance
        self.target = TARGETS[target]
        self.steps = steps
        self.guidance = guidance
        self.prediction = prediction
        self.timesteps = sampler.ddim_timesteps(steps)

        # Move the UNet before, not after, building the trainer
        self.device = next(iter(self.params.values())).device
        self.autocast = torch.autocast(
            self.device.type, dtype=dtype, enabled=dtype != torch.float32
        )

    def eps(self, x, t, cond, frozen=False):
        """ε(x, t, cond) with the weights being trained, or (frozen=True) with the originals;
        cond: a conditioning (sampler.py: a text context, or SDXL's (context, added))."""
        args = (x, t, *sampler.inputs(cond))

        # LoRA: frozen is the same modules with the low-rank update switched off
        if self.lora is not None:
            with self.lora.off() if frozen else contextlib.nullcontext():
                return self.unet(*args)

        # frozen: the same module, the originals in place of the trained tensors
        swapped = self.originals if frozen else {}
        return functional_call(self.unet, swapped, args)

    @torch.no_grad()
    def frozen_eps(self, x_t, t, conds):
        """ε of the frozen θ at x_t under each conditioning in `conds` (batch B each), computed
        in ONE UNet call: a tuple, one [B, 4, h, w] per conditioning."""
        k = len(conds)
        with self.autocast:
            e = self.eps(torch.cat([x_t] * k), t.repeat(k), sampler.cat(conds), frozen=True)
        return e.float().chunk(k)

    @torch.no_grad()
    def sample(self, x_T, cond, uncond, until, xt_from="trained", trajectory=False):
        """x after `until` guided DDIM steps from noise x_T: it sits at timestep
        self.timesteps[until]. trajectory=True: every step's x up to there, [until + 1, B, 4, h, w].
        xt_from (an XT_FROM key): the weights being trained, or the frozen originals."""
        frozen = XT_FROM[xt_from]
        with self.autocast:
            return sampler.sample(
                lambda x, t, *c: self.eps(x, t, c, frozen),
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
        """MSE between the trained ε_θ*(x_t, c, t) and the target from the frozen θ.

        x_t [B, 4, h, w] sits after t_enc DDIM steps (one for the batch, or a LongTensor of one per
        row); conditionings (sampler.py): cond of batch B, uncond and anchor of batch 1. With an
        anchor a the trained model is asked on a's prompt (x_t should show a's images): c is
        erased from them."""
        # The timestep x_t sits at. train-esd.py instead draws a DDPM t from
        # [t_enc, t_enc + 1) * 1000/steps, but its sampler stops where x is 2-3 DDIM steps less
        # noisy than that t says.
        n = len(x_t)
        t = self.timesteps[t_enc].expand(n)
        # uncond (and anchor) of batch 1: one per row
        uncond = sampler.cat([uncond] * n)

        # The paper: e_0 and e_c from the frozen θ (one batch), the target e_0 − η(e_c − e_0),
        # and the trained model asked on c.
        if anchor is None:
            e_0, e_c = self.frozen_eps(x_t, t, [uncond, cond])
            target = self.target(e_0, e_c, self.negative_guidance)
            asked = cond
        else:
            # With an anchor a (esd_sd.py --erase_from): e_a joins the same batch as the
            # target's base, and the trained model is asked on a.
            anchor = sampler.cat([anchor] * n)
            e_0, e_c, e_a = self.frozen_eps(x_t, t, [uncond, cond, anchor])
            target = self.target(e_0, e_c, self.negative_guidance, e_a)
            asked = anchor

        # The trained θ*, with grad
        with self.autocast:
            e_n = self.eps(x_t, t, asked)
        return F.mse_loss(e_n.float(), target)

    def delta(self):
        """{name: tensor} of the trained tensors, detached, on the CPU: a delta file's content
        (LoRA: a kohya file's, lora.py)."""
        if self.lora is not None:
            return self.lora.state()
        return {name: p.detach().cpu().contiguous() for name, p in self.params.items()}


def draw(seed, stream, i, n_concepts, steps):
    """(concept index, t_enc, noise seed) number i of a stream of draws: e.g. stream "iteration"
    and i the iteration, or "pool0" and i a pool entry. They depend on (seed, stream, i) alone,
    so a resumed run draws what an uninterrupted one does."""
    rng = random.Random(f"{seed}/{stream}/{i}")
    noise_seed = rng.getrandbits(62)
    concept_index = rng.randrange(n_concepts)
    t_enc = rng.randrange(steps)
    return concept_index, t_enc, noise_seed


class PaperXt:
    """The paper's x_t: every iteration samples B fresh x_t, t_enc guided DDIM steps from seeded
    noise, with the weights being trained (xt_from="trained"; or the frozen ones: "frozen").

    draw(it) -> (concept index per row, t_enc, x_t [B, 4, h, w]): the concept, t_enc and noise
    come from draw(seed, "iteration", it, ...). conditionings: one (batch 1) per concept to sample
    x_t with (with an anchor: the anchor's); uncond: the empty prompt's."""

    def __init__(
        self,
        trainer,
        conditionings,
        uncond,
        latent_shape,
        *,
        seed=0,
        batch_size=1,
        xt_from="trained",
    ):
        self.trainer = trainer
        self.conditionings = conditionings
        self.uncond = uncond
        self.latent_shape = latent_shape
        self.seed = seed
        self.batch_size = batch_size
        self.xt_from = xt_from

    def numbers(self, stream, i):
        """draw(...) with this source's seed, number of concepts and DDIM steps."""
        return draw(self.seed, stream, i, len(self.conditionings), self.trainer.steps)

    def sample(self, concept_indices, noise_seeds, n, until, trajectory=False):
        """x_t (or, trajectory=True, every step's x up to it) of n noises per seed, each seed under
        its concept's conditioning, all in one batch (noise[:1] is the same for every n)."""
        noises = [
            torch.randn((n, *self.latent_shape), generator=torch.Generator().manual_seed(s))
            for s in noise_seeds
        ]
        x_T = torch.cat(noises).to(self.trainer.device)
        cond = sampler.cat([self.conditionings[c] for c in concept_indices for _ in range(n)])
        uncond = sampler.cat([self.uncond] * len(x_T))
        return self.trainer.sample(x_T, cond, uncond, until, self.xt_from, trajectory)

    def draw(self, it):
        concept_index, t_enc, noise_seed = self.numbers("iteration", it)
        x_t = self.sample([concept_index], [noise_seed], self.batch_size, t_enc)
        return [concept_index] * self.batch_size, t_enc, x_t

    def state(self):
        """Nothing to keep for --resume: every x_t is sampled afresh."""
        return {}

    def restore(self, state):
        pass


class TrajectoryPool(PaperXt):
    """An on-policy trajectory pool (docs/design.md, "Where x_t costs most"): x_t read from
    `size` trajectories (every DDIM step's x) sampled in one batch with the weights being trained,
    rebuilt every `refresh` iterations (0: never). Built like PaperXt, whose sampling it uses.

    Iteration it draws its t_enc as PaperXt does, and reads entries it*B .. it*B+B-1 (mod size)
    at that t_enc. paths [last + 1, size, 4, h, w] holds the pool, concept_indices each entry's
    concept, built the generation they belong to (None before the first draw)."""

    def __init__(self, *args, size=4, refresh=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = size
        self.refresh = refresh
        self.concept_indices = []
        self.paths = None
        self.built = None

    def build(self, generation):
        """Sample the pool of `generation`: each entry up to the last t_enc its iterations draw."""
        served = range(generation * self.refresh, (generation + 1) * self.refresh)
        t_encs = [self.numbers("iteration", it)[1] for it in served]
        last = max(t_encs, default=self.trainer.steps - 1)

        # Each entry's own concept and noise, from a stream of its own
        entries = [self.numbers(f"pool{generation}", i) for i in range(self.size)]
        concept_indices, _, noise_seeds = zip(*entries)
        self.concept_indices = list(concept_indices)
        self.built = generation

        # One batch: [last + 1, size, 4, h, w]
        self.paths = self.sample(concept_indices, noise_seeds, 1, last, trajectory=True)

    def draw(self, it):
        _, t_enc, _ = self.numbers("iteration", it)

        # (Re)build when the iteration starts a new generation
        generation = it // self.refresh if self.refresh else 0
        if generation != self.built:
            self.build(generation)

        # B consecutive entries, at this iteration's t_enc
        rows = [(it * self.batch_size + j) % self.size for j in range(self.batch_size)]
        concept_indices = [self.concept_indices[i] for i in rows]
        return concept_indices, t_enc, self.paths[t_enc, rows]

    def state(self):
        """The pool being read, for --resume: an on-policy pool was sampled by earlier weights
        than the checkpoint's. (The key "concepts" holds the entries' concept indices.)"""
        return {"built": self.built, "concepts": self.concept_indices, "paths": self.paths}

    def restore(self, state):
        self.built = state["built"]
        self.concept_indices = state["concepts"]
        paths = state["paths"]
        self.paths = None if paths is None else paths.to(self.trainer.device)


# Where each iteration's x_t comes from, by name (train.py: "pool" when --trajectory-pool > 0)
XT_SOURCES = {"paper": PaperXt, "pool": TrajectoryPool}
