"""End to end: sample.py on a tiny random model gives the image diffusers' StableDiffusionPipeline
(DDIMScheduler, SD v1.5 config) gives for the same seed, steps and guidance, from a diffusers
folder and from the same weights as an official-layout single file; each PNG carries its own prompt
and seed in A1111's format; bad input exits 2."""

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle"
NEGATIVE = "blue"
SEED = 3
STEPS = 4
GUIDANCE = 7.5
SIZE = 16


def run(*args):
    """sample.py as users run it: a fresh process (slow to start: torch + transformers imports)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


def run_inline(capsys, *args):
    """sample.main in this process: same code path as the CLI minus the interpreter start."""
    code = sample.main(list(map(str, args)))
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


@pytest.fixture(scope="module")
def reference(tiny_sd):
    """(diffusers folder, single file, tokenizer folder, the pipeline's uint8 images for seeds
    SEED, SEED + 1)."""
    with torch.no_grad():
        out = [
            tiny_sd.pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                height=SIZE,
                width=SIZE,
                generator=torch.Generator("cpu").manual_seed(SEED + i),
                output_type="np",
            ).images[0]
            for i in range(2)
        ]
    return (
        tiny_sd.folder,
        tiny_sd.single,
        tiny_sd.tokenizer,
        [(x * 255).round().astype(np.uint8) for x in out],
    )


def parse_infotext(text):
    """A1111's PNG `parameters` text, read as its format is described: the prompt lines, an optional
    line "Negative prompt: ...", and a last line of "Key: value" pairs separated by ", " (values may
    be quoted)."""
    *lines, settings = text.split("\n")
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")]
    prompt = "\n".join(lines[: negative[0]] if negative else lines)
    pairs = dict(re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings))
    if negative:
        negative_prompt = "\n".join(lines[negative[0] :])[len("Negative prompt: ") :]
    else:
        negative_prompt = ""
    return dict(pairs, prompt=prompt, negative_prompt=negative_prompt)


@pytest.mark.parametrize("kind", ["folder", "single-file"])
def test_sample_cli_matches_diffusers_pipeline(reference, tmp_path, capsys, kind):
    folder, single, tokenizer, expected = reference
    if kind == "folder":
        model = ["--model", folder]
    else:
        model = ["--model", single, "--tokenizer", tokenizer]
    settings = ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", SEED]
    settings += ["--steps", STEPS, "--guidance", GUIDANCE, "--height", SIZE, "--width", SIZE]
    outputs = ["--num-images", 2, "--output", tmp_path / "x.png", "--device", "cpu"]
    # The folder in a real process, the single file in this one.
    sample_cli = run if kind == "folder" else functools.partial(run_inline, capsys)
    r = sample_cli(*model, *settings, *outputs)
    assert r.returncode == 0, r.stderr

    # Image i has seed SEED + i: the pipeline's image for that seed.
    for i in range(2):
        image = Image.open(tmp_path / f"x-{i}.png")
        diff = np.abs(np.asarray(image).astype(int) - expected[i].astype(int))
        assert diff.max() <= 1, f"image {i}: max pixel difference {diff.max()}/255"
        a1111 = parse_infotext(image.text["parameters"])
        keys = ("prompt", "negative_prompt", "Seed", "Steps", "Sampler", "CFG scale", "Size")
        want = (
            PROMPT,
            NEGATIVE,
            str(SEED + i),
            str(STEPS),
            "DDIM",
            str(GUIDANCE),
            f"{SIZE}x{SIZE}",
        )
        assert tuple(a1111[k] for k in keys) == want
        # The model's file or folder name.
        assert a1111["Model"] == ("diffusers" if kind == "folder" else "sd")
        ours = json.loads(image.text["esd"])
        keys = ("prompt", "seed", "steps", "delta")
        assert tuple(ours[k] for k in keys) == (PROMPT, SEED + i, STEPS, [])


def test_infotext_parser_reads_a1111_examples():
    """The parser above on A1111-style texts written by hand: several prompt lines, quoted values,
    no negative."""
    text = (
        "a cat,\nin a hat\nNegative prompt: dog\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768"
    )
    assert parse_infotext(text) == {
        "prompt": "a cat,\nin a hat",
        "negative_prompt": "dog",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "1",
        "Size": "512x768",
    }
    parsed = parse_infotext('x\nSteps: 5, Lora hashes: "a: 1, b: 2", Seed: 3')
    assert parsed["negative_prompt"] == ""
    assert parsed["Lora hashes"] == '"a: 1, b: 2"'
    assert parsed["Seed"] == "3"


def test_bad_input_is_one_line_exit_2(reference, tmp_path, capsys):
    folder, _, _, _ = reference
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(reference[1].read_bytes()[:1000])
    cases = [
        ("--model", tmp_path / "missing.safetensors"),
        ("--model", truncated),
        ("--model", folder, "--height", 13),
        ("--model", folder, "--output", tmp_path / "no" / "x.png"),
        ("--model", folder, "--variant", "fp16"),
        ("--model", reference[1], "--variant", "fp16"),
    ]
    # The first case in a real process: exit code and stderr as users see them.
    for i, case in enumerate(cases):
        sample_cli = run if i == 0 else functools.partial(run_inline, capsys)
        r = sample_cli(*case, "--prompt", PROMPT, "--steps", 1, "--device", "cpu")
        assert r.returncode == 2, (case, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert r.stderr.startswith("error: ")
