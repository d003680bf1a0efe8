"""delta.py: ESD delta files, the trained UNet tensors under diffusers names: save, load, apply,
and `with applied(unet, delta):` for one block with the originals always put back. A LoRA file
(kohya's layout, lora.py) is a delta too: applied, its update is merged into the weights.

Ours: .safetensors with string metadata (docs/design.md, "ESD delta file"). Also read, never with
pickled code: the official ESD weights, diffusers-named UNet tensors (esd_sd.py's .safetensors,
train-esd.py's diffusers .pt), and train-esd.py's compvis .pt, the whole edited model as an LDM
state dict (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`): its UNet part,
names mapped by convert.py; ESD leaves the VAE and text encoder as they were.
"""

import contextlib
import os

import torch
from safetensors.torch import save_file

import convert
import files
import lora
from files import LoadError

FORMAT = "esd-delta/1"  # metadata "format" of our delta files
RESUME = ".resume.pt"  # beside a delta: what continues its training
LDM_UNET = "model.diffusion_model."  # the UNet's prefix in an LDM state dict


def save(path, tensors, metadata):
    """A delta ({name: tensor}) as .safetensors with string metadata, atomically."""
    metadata = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}
    files.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def save_checkpoint(path, tensors, metadata, state):
    """A delta and beside it `path`.resume.pt: `state` (e.g. Adam's) and the tensors, written
    first. Both atomic: a run killed between the two writes leaves a .resume.pt newer than its
    delta, never a mixed pair."""
    resume = dict(state, tensors=tensors)
    files.atomic_write(path + RESUME, lambda tmp: torch.save(resume, tmp))
    save(path, tensors, metadata)


def load_checkpoint(path, mmap=False):
    """The state save_checkpoint wrote beside delta `path`, tensors included (weights_only)."""
    try:
        state = torch.load(path + RESUME, weights_only=True, mmap=mmap)
        # a dict with tensors, or KeyError / TypeError
        return dict(state, tensors=state["tensors"])
    except Exception as e:
        # missing, empty, truncated, pickled code, another kind of file: whatever torch raises
        raise LoadError(f"cannot resume from {path}{RESUME}: {files.first_line(e)}") from None


def load(path, config=None):
    """(tensors, metadata) of a delta file, ours or official. `config`: the UNet's, for the block
    numbers of an LDM state dict (default SD v1's, the model the official ESD weights edit)."""
    tensors = files.read_tensors(str(path))
    # train-esd.py's whole model: keep its UNet
    if any(k.startswith(LDM_UNET) for k in tensors):
        tensors = {
            convert.ldm_to_ours(k, config).removeprefix("unet."): t
            for k, t in tensors.items()
            if k.startswith(LDM_UNET)
        }
    return tensors, files.read_metadata(path)


@torch.no_grad()
def apply(unet, tensors):
    """Copy a delta's tensors into `unet`; LoadError, with nothing copied, if a name, shape or
    value does not fit."""
    params = dict(unet.named_parameters())
    bad = [k for k, v in tensors.items() if k not in params or params[k].shape != v.shape]
    if bad or not tensors:
        example = f", e.g. {bad[0]}" if bad else ""
        raise LoadError(
            f"the delta does not fit this UNet: {len(bad)} of {len(tensors)} tensors have unknown "
            f"names or other shapes{example}"
        )

    not_finite = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise LoadError(
            f"the delta holds NaN or infinite values in {len(not_finite)} tensors, "
            f"e.g. {not_finite[0]}"
        )

    for k, v in tensors.items():
        params[k].copy_(v)
    return unet


def weights(unet, tensors, scale=1.0):
    """{name: tensor} that a delta's `tensors` set in `unet` at strength `scale`: a LoRA's
    W + scale·(α/r)·B·A (lora.merged, as A1111's <lora:name:scale>), an ESD delta's
    W + scale·(W* − W) (1: W*, the trained weights); LoadError for a LoRA of other modules."""
    if any(k.startswith(lora.PREFIX) for k in tensors):
        try:
            return lora.merged(unet, tensors, scale)
        except ValueError as e:
            raise LoadError(str(e)) from None
    if scale == 1:
        return tensors

    # Tensors of other names or shapes as they are: apply() refuses them
    params = dict(unet.named_parameters())
    return {
        k: torch.lerp(params[k].detach(), v.to(params[k]), scale)
        if k in params and params[k].shape == v.shape
        else v
        for k, v in tensors.items()
    }


@contextlib.contextmanager
def applied(unet, *deltas, scale=1.0):
    """Inside the block, `unet` has the deltas (files or {name: tensor}) applied in order, each at
    strength `scale` (weights()); afterwards, also after an error, every tensor they touched has
    its original value again."""
    params = dict(unet.named_parameters())
    originals = {}
    try:
        for d in deltas:
            is_file = isinstance(d, (str, os.PathLike))
            tensors = load(d, unet.config)[0] if is_file else d
            try:
                tensors = weights(unet, tensors, scale)
                for k in tensors:
                    if k in params and k not in originals:
                        originals[k] = params[k].detach().clone()
                apply(unet, tensors)
            except LoadError as e:
                raise LoadError(f"cannot apply delta {d}: {e}" if is_file else str(e)) from None
        yield unet
    finally:
        with torch.no_grad():
            for k, v in originals.items():
                params[k].copy_(v)
