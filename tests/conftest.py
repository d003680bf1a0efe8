"""One torch thread for the whole suite: on small, shared CPUs the tiny models run faster and far
steadier single-threaded than with threads fighting over the cores. And the one tiny model most
tests load, built once per session."""
from types import SimpleNamespace

import pytest
import torch

import load_sd
import tiny

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random diffusers SD v1 pipeline saved as a folder, and the same weights as an official-layout
    single file written by our writer: (pipe, folder, single, tokenizer). Tests must not modify them."""
    root = tmp_path_factory.mktemp("tiny-sd")
    pipe = tiny.pipeline(folder=root / "diffusers")
    sd = load_sd.StableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, "sd1", "epsilon", "tiny")
    load_sd.save_single_file(sd, root / "sd.safetensors")  # diffusers' modules written by ours_to_ldm
    return SimpleNamespace(pipe=pipe, folder=root / "diffusers", single=root / "sd.safetensors",
                           tokenizer=root / "diffusers" / "tokenizer")
