"""One torch thread for the whole suite: on small, shared CPUs the tiny models run faster and far
steadier single-threaded than with threads fighting over the cores. And the one tiny model most
tests load, built once per session. MKL in its strict reproducible mode: on AVX-512 CPUs its default
picks kernels by memory alignment, so two equal computations on equal tensors at other addresses (a
deepcopy, the kept originals of esd.py) could differ in the last bit, and the bitwise-equality tests
would fail there."""

import os
from types import SimpleNamespace

# Read when MKL first runs: set before torch computes anything.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

import load_sd  # noqa: E402
import tiny  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random diffusers SD v1 pipeline saved as a folder, and the same weights as an
    official-layout single file written by our writer: (pipe, folder, single, tokenizer). Tests must
    not modify them."""
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = tiny.pipeline(folder=root / "diffusers")
    sd = load_sd.StableDiffusion(
        pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, "sd1", "epsilon", "tiny"
    )
    # diffusers' modules written by ours_to_ldm.
    load_sd.save_single_file(sd, root / "sd.safetensors")
    return SimpleNamespace(
        pipe=pipe,
        folder=root / "diffusers",
        single=root / "sd.safetensors",
        tokenizer=root / "diffusers" / "tokenizer",
    )
