"""End to end: sample.py on a tiny random model gives the image diffusers' StableDiffusionPipeline
(DDIMScheduler, SD v1.5 config) gives for the same seed, steps and guidance, from a diffusers
folder and from the same weights as an official-layout single file; bad input exits 2."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import load_sd
import sample
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, SEED, STEPS, GUIDANCE, SIZE = "a red circle", 3, 4, 7.5, 16


def run(*args):
    """sample.py as users run it: a fresh process (slow to start: torch + transformers imports)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def run_inline(capsys, *args):
    """sample.main in this process: same code path as the CLI minus the interpreter start."""
    code = sample.main(list(map(str, args)))
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers folder, single file, tokenizer folder, the pipeline's uint8 images for 2 images)."""
    root = tmp_path_factory.mktemp("model")
    pipe = tiny.pipeline(folder=root / "diffusers")
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                   num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(SEED),
                   output_type="np").images
    single = root / "sd.safetensors"
    load_sd.save_single_file(load_sd.load(str(root / "diffusers")), str(single))
    return root / "diffusers", single, root / "diffusers" / "tokenizer", (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["folder", "single-file"])
def test_sample_cli_matches_diffusers_pipeline(reference, tmp_path, capsys, kind):
    folder, single, tokenizer, expected = reference
    model = ["--model", folder] if kind == "folder" else ["--model", single, "--tokenizer", tokenizer]
    r = (run if kind == "folder" else functools.partial(run_inline, capsys))(*model, "--prompt", PROMPT, "--seed", SEED, "--steps", STEPS, "--guidance", GUIDANCE,
            "--height", SIZE, "--width", SIZE, "--num-images", 2, "--output", tmp_path / "x.png", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        image = Image.open(tmp_path / f"x-{i}.png")
        diff = np.abs(np.asarray(image).astype(int) - expected[i].astype(int))
        assert diff.max() <= 1, f"image {i}: max pixel difference {diff.max()}/255"
        params = json.loads(image.text["parameters"])
        assert (params["prompt"], params["seed"], params["steps"], params["index"]) == ([PROMPT], SEED, STEPS, i)


def test_bad_input_is_one_line_exit_2(reference, tmp_path, capsys):
    folder, _, _, _ = reference
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(reference[1].read_bytes()[:1000])
    cases = [("--model", tmp_path / "missing.safetensors"), ("--model", truncated),
             ("--model", folder, "--height", 13), ("--model", folder, "--output", tmp_path / "no" / "x.png")]
    for i, case in enumerate(cases):  # the first case in a real process: exit code and stderr as users see them
        r = (run if i == 0 else functools.partial(run_inline, capsys))(*case, "--prompt", PROMPT, "--steps", 1,
                                                                        "--device", "cpu")
        assert r.returncode == 2, (case, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert r.stderr.startswith("error: ")
