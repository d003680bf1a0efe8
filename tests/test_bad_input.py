"""Every bad input to train.py, sample.py, evaluate.py and app.py's flags, as a hostile user would
try it on the toy model: one row each (the command, the exit code, a piece of the one error line,
the files that must not change). A bad input is refused with one line on stderr, no traceback,
before any work, and destroys nothing."""

import dataclasses
import errno
import hashlib
import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
import delta
import evaluate
import load_sd
import lora
import sample
import tiny
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "assets", "toy")
# A train.py run that gets as far as training: two toy iterations.
QUICK = ["--iterations", "2", "--no-eval"]
# 100 words: past CLIP's 77 tokens, and past a file name's 255 bytes.
LONG_CONCEPT = " ".join(["circle"] * 100)
XL_TOKENIZER = ["--tokenizer", "{base}/xl/diffusers/tokenizer"]


@dataclasses.dataclass
class Row:
    name: str
    cli: str  # "train" | "sample" | "evaluate" | "prompts" (evaluate.py --prompts FILE.csv)
    # "{ws}" is the row's own folder, filled with workspace()'s files; "{base}" base()'s, read only.
    args: list
    code: int = 2
    says: str = ""  # a piece of stderr (the error line, or a warning)
    unchanged: tuple = ()  # paths (with {ws}) whose content or kind must not change
    # (target, replacement) monkeypatched while the row runs: a library's function, never ours.
    patch: tuple = None
    then: object = None  # check(ws) after the run


def same_tensors(a, b):
    x, meta = delta.load(a)
    y, _ = delta.load(b)
    return (
        meta["iterations"] == "3"
        and x.keys() == y.keys()
        and all(torch.equal(x[k], y[k]) for k in x)
    )


def named_in_bytes(ws, method, concept):
    """The default output of `concept` is there, named by its first letters: as many as
    cli.MAX_NAME (64) bytes hold."""
    names = [f for f in os.listdir(ws) if f.startswith(f"{method}-") and f.endswith(".safetensors")]
    stem = names[0].removeprefix(f"{method}-").removesuffix(".safetensors")
    size = len(stem.encode())
    return len(names) == 1 and concept.startswith(stem) and 64 - 4 < size <= 64


def app_main(argv):
    """app.py's main (the demo's packages: pip install -r requirements-app.txt)."""
    return pytest.importorskip("app").main(argv)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


REAL_FIND_SPEC = importlib.util.find_spec


def no_cached_model(*args, **kwargs):
    raise OSError("not in the local cache")


def without_nudenet(name, package=None):
    """importlib's find_spec on a machine without NudeNet."""
    return None if name == "nudenet" else REAL_FIND_SPEC(name, package)


# Prompt CSVs in the official format, good and bad: {name: text}.
HEADER = "case_number,prompt,evaluation_seed,evaluation_guidance,class\n"
CSVS = {
    "good.csv": HEADER + "0,a circle,1,5.0,circle\n",
    "no-seed.csv": "case_number,prompt,evaluation_guidance\n0,a circle,5.0\n",
    "word-seed.csv": HEADER + "0,a circle,seven,5.0,circle\n",
    "negative-seed.csv": HEADER + "0,a circle,-1,5.0,circle\n",
    "last-seed.csv": HEADER + f"0,a circle,{2**63 - 1},5.0,circle\n",
    "nan-guidance.csv": HEADER + "0,a circle,1,nan,circle\n",
    "empty-guidance.csv": HEADER + "0,a circle,1,,circle\n",
    "twice.csv": HEADER + "0,a circle,1,5.0,circle\n0,a square,2,5.0,square\n",
    "bad-case.csv": HEADER + "x,a circle,1,5.0,circle\n",
    "empty.csv": "",
    "header-only.csv": HEADER,
    # The official small_imagenet_prompts.csv's columns: no evaluation_guidance
    "no-guidance.csv": ",case_number,prompt,evaluation_seed,class\n0,0,a circle,1,circle\n",
}


class Payload:
    def __reduce__(self):  # unpickling would run this: it must not
        ws = os.environ.get("ESD_TEST_WS", "/nonexistent")
        return os.mkdir, (os.path.join(ws, "pwned"),)


ROWS = [
    # 1. Output paths that would destroy things
    Row(
        "train output is a device",
        "train",
        ["--output", "{ws}/full"],
        says="not a regular file",
        unchanged=("{ws}/full",),
    ),
    Row(
        "sample output is a device",
        "sample",
        ["--output", "{ws}/full"],
        says="not a regular file",
        unchanged=("{ws}/full",),
    ),
    Row(
        "evaluate output is a device",
        "evaluate",
        ["--output", "{ws}/dev"],
        says="not a regular file",
        unchanged=("{ws}/dev.json",),
    ),
    Row(
        "train output is a symlink",
        "train",
        ["--output", "{ws}/link.safetensors"],
        says="symlink",
        unchanged=("{ws}/existing.safetensors", "{ws}/link.safetensors"),
    ),
    Row(
        "sample output is a symlink",
        "sample",
        ["--output", "{ws}/link.png"],
        says="symlink",
        unchanged=("{ws}/target.png",),
    ),
    Row(
        "train output is the model",
        "train",
        [
            "--model",
            "{ws}/model.safetensors",
            "--tokenizer",
            f"{TOY}/tokenizer",
            "--output",
            "{ws}/model.safetensors",
        ],
        says="is an input",
        unchanged=("{ws}/model.safetensors",),
    ),
    Row(
        "train output is the model, spelled otherwise",
        "train",
        [
            "--model",
            "{ws}/model.safetensors",
            "--tokenizer",
            f"{TOY}/tokenizer",
            "--output",
            "{ws}/sub/../model.safetensors",
        ],
        says="is an input",
        unchanged=("{ws}/model.safetensors",),
    ),
    Row(
        "train output is the shipped toy",
        "train",
        ["--output", f"{TOY}/toy.safetensors", "--overwrite"],
        says="is an input",
        unchanged=(f"{TOY}/toy.safetensors",),
    ),
    Row(
        "sample output is its delta",
        "sample",
        ["--delta", "{ws}/existing.safetensors", "--output", "{ws}/existing.safetensors"],
        says="is an input",
        unchanged=("{ws}/existing.safetensors",),
    ),
    Row(
        "train overwrites an existing delta",
        "train",
        ["--output", "{ws}/existing.safetensors"],
        says="--overwrite",
        unchanged=("{ws}/existing.safetensors", "{ws}/existing.safetensors.resume.pt"),
    ),
    Row(
        "train --overwrite replaces it",
        "train",
        ["--output", "{ws}/existing.safetensors", "--overwrite", *QUICK],
        0,
        then=lambda ws: delta.load(f"{ws}/existing.safetensors")[1]["iterations"] == "2",
    ),
    Row(
        "export-diffusers folder exists",
        "train",
        ["--export-diffusers", "{ws}/sub", *QUICK],
        says="exists",
        unchanged=("{ws}/sub",),
        then=lambda ws: not os.path.exists(f"{ws}/esd-x-circle.safetensors"),
    ),
    Row(
        "output in /proc (not writable, even for root)",
        "train",
        ["--output", "/proc/esd.safetensors"],
        says="cannot write",
    ),
    Row("sample output in /sys", "sample", ["--output", "/sys/esd.png"], says="cannot write"),
    # 2. Failures that used to come after the work
    Row(
        "train output is a directory",
        "train",
        ["--output", "{ws}/sub"],
        says="not a regular file",
        unchanged=("{ws}/sub",),
    ),
    Row(
        "a 500-word concept gets a short default name",
        "train",
        ["--concept", " ".join(["circle"] * 500), *QUICK],
        0,
        says="longer than",
        then=lambda ws: any(f.startswith("esd-x-circle") and len(f) < 120 for f in os.listdir(ws)),
    ),
    Row(
        "an explicit file name too long",
        "train",
        ["--output", "{ws}/" + "x" * 300 + ".safetensors"],
        says="cannot write",
    ),
    Row(
        "export-full into a directory",
        "train",
        ["--export-full", "{ws}/sub", *QUICK],
        says="not a regular file",
        unchanged=("{ws}/sub",),
        then=lambda ws: not os.path.exists(f"{ws}/esd-x-circle.safetensors"),
    ),
    Row(
        "export-full into /proc",
        "train",
        ["--export-full", "/proc/full.safetensors", *QUICK],
        says="cannot write",
        then=lambda ws: not os.path.exists(f"{ws}/esd-x-circle.safetensors"),
    ),
    Row(
        "export-full is the model",
        "train",
        [
            "--model",
            "{ws}/model.safetensors",
            "--tokenizer",
            f"{TOY}/tokenizer",
            "--export-full",
            "{ws}/model.safetensors",
            *QUICK,
        ],
        says="is an input",
        unchanged=("{ws}/model.safetensors",),
    ),
    Row(
        "disk full while saving the delta",
        "train",
        ["--output", "{ws}/full.safetensors", *QUICK],
        1,
        says="No space left on device; the checkpoint of iteration 2 is kept",
        patch=("safetensors.torch.serialize_file", no_space),
        then=lambda ws: not os.path.exists(f"{ws}/full.safetensors"),
    ),
    Row(
        "disk full while saving the checkpoint",
        "train",
        ["--output", "{ws}/full.safetensors", *QUICK],
        1,
        says="No space left on device; nothing saved",
        patch=("torch.save", no_space),
        then=lambda ws: not any(f.startswith("full.safetensors") for f in os.listdir(ws)),
    ),
    Row(
        "sample output folder missing", "sample", ["--output", "{ws}/missing/x.png"], says="folder"
    ),
    Row(
        "evaluate output folder missing", "evaluate", ["--output", "{ws}/missing/e"], says="folder"
    ),
    # 3. Resume
    Row(
        "resume with another lr",
        "train",
        ["--output", "{ws}/existing.safetensors", "--resume", "--lr", "0.5", "--iterations", "4"],
        says="lr",
        unchanged=("{ws}/existing.safetensors",),
    ),
    Row(
        "resume with another prediction type",
        "train",
        [
            "--output",
            "{ws}/existing.safetensors",
            "--resume",
            "--prediction-type",
            "v_prediction",
            "--iterations",
            "4",
        ],
        says="prediction_type",
        unchanged=("{ws}/existing.safetensors",),
    ),
    Row(
        "resume with fewer iterations",
        "train",
        ["--output", "{ws}/existing.safetensors", "--resume", "--iterations", "1"],
        says="at iteration 2",
        unchanged=("{ws}/existing.safetensors",),
    ),
    Row(
        "resume from an empty .resume.pt",
        "train",
        ["--output", "{ws}/empty.safetensors", "--resume"],
        says="cannot resume",
        unchanged=("{ws}/empty.safetensors", "{ws}/empty.safetensors.resume.pt"),
    ),
    Row(
        "resume from a malformed .resume.pt",
        "train",
        ["--output", "{ws}/garbage.safetensors", "--resume"],
        says="cannot resume",
        unchanged=("{ws}/garbage.safetensors.resume.pt",),
    ),
    Row(
        "resume from a pickled-code .resume.pt",
        "train",
        ["--output", "{ws}/code.safetensors", "--resume"],
        says="cannot resume",
        then=lambda ws: not os.path.exists(f"{ws}/pwned"),
    ),
    Row(
        "resume from a state dict of the wrong kind",
        "train",
        ["--output", "{ws}/wrong.safetensors", "--resume"],
        says="cannot resume",
    ),
    Row(
        "resume with nothing to resume",
        "train",
        ["--output", "{ws}/none.safetensors", "--resume"],
        says="cannot resume",
    ),
    Row(
        "resume from a .resume.pt newer than its delta (killed between the writes)",
        "train",
        ["--output", "{ws}/mixed.safetensors", "--resume", "--iterations", "3", "--no-eval"],
        0,
        then=lambda ws: same_tensors(f"{ws}/mixed.safetensors", f"{ws}/three.safetensors"),
    ),
    # 4. Numbers
    *[
        Row(f"train {flag} {value}", "train", [flag, value], says=flag)
        for flag, value in [
            ("--lr", "nan"),
            ("--lr", "-1"),
            ("--lr", "inf"),
            ("--guidance", "nan"),
            ("--negative-guidance", "inf"),
            ("--negative-guidance", "nan"),
            ("--iterations", "0"),
            ("--batch-size", "0"),
            ("--steps", "1000"),
            ("--steps", "0"),
            ("--save-every", "-1"),
            ("--trajectory-pool", "-1"),
            ("--pool-refresh", "-2"),
            ("--seed", str(2**70)),
            ("--seed", "-1"),
            ("--resolution", "12"),
            ("--resolution", "100000"),
            ("--resolution", "-8"),
        ]
    ],
    *[
        Row(f"sample {flag} {value}", "sample", [flag, value], says=flag)
        for flag, value in [
            ("--guidance", "nan"),
            ("--steps", "1000"),
            ("--steps", "0"),
            ("--seed", "99999999999999999999999"),
            ("--seed", "-1"),
            ("--height", "0"),
            ("--height", "100000"),
            ("--width", "13"),
            ("--num-images", "0"),
            ("--batch-size", "0"),
        ]
    ],
    *[
        Row(f"evaluate {flag} {value}", "evaluate", [flag, value], says=flag)
        for flag, value in [
            ("--guidance", "nan"),
            ("--seeds", "0"),
            ("--steps", "0"),
            ("--steps", "1000"),
        ]
    ],
    Row(
        "evaluate --guidance 0 is allowed",
        "evaluate",
        ["--guidance", "0", "--seeds", "1", "--steps", "2", "--output", "{ws}/e"],
        0,
        then=lambda ws: '"guidance": 0.0' in open(f"{ws}/e.json").read(),
    ),
    Row("a delta full of NaN", "sample", ["--delta", "{ws}/nan.safetensors"], says="NaN"),
    Row("unknown flag", "train", ["--frobnicate", "3"], says="unrecognized arguments"),
    Row("a number that is not one", "sample", ["--steps", "many"], says="--steps"),
    # 5. Scale
    Row(
        "sample 40 images in batches of 8, written as they come",
        "sample",
        [
            "--num-images",
            "20",
            "--prompt",
            "a square",
            "--batch-size",
            "8",
            "--steps",
            "1",
            "--output",
            "{ws}/s.png",
        ],
        0,
        then=lambda ws: len([f for f in os.listdir(ws) if f.startswith("s-")]) == 40,
    ),
    Row(
        "out of memory",
        "sample",
        ["--height", "4096", "--width", "4096"],
        1,
        says="try a smaller --height",
        patch=("torch.randn", out_of_memory),
    ),
    Row(
        "out of memory while training",
        "train",
        ["--resolution", "4096", *QUICK],
        1,
        says="try a smaller --resolution",
        patch=("torch.randn", out_of_memory),
    ),
    # 6. Leftovers
    Row(
        "a killed run's temporary file is cleaned up",
        "train",
        ["--output", "{ws}/left.safetensors", *QUICK],
        0,
        then=lambda ws: not any(".tmp-" in f for f in os.listdir(ws)),
    ),
    # 7. Silent truncation
    Row(
        "a concept past 77 tokens is warned about",
        "train",
        ["--concept", LONG_CONCEPT, "--output", "{ws}/l.safetensors", *QUICK],
        0,
        says="first dropped word",
    ),
    Row(
        "a prompt past 77 tokens is warned about once",
        "sample",
        ["--prompt", LONG_CONCEPT, "--num-images", "2", "--output", "{ws}/l.png"],
        0,
        says="first dropped word",
    ),
    # More
    Row("no concept", "train", ["--concept", " , "], says="--concept"),
    # A file name is at most 255 bytes: a concept of 4-byte letters (256 bytes) or 3-byte ones.
    Row(
        "a concept of 64 four-byte letters",
        "train",
        ["--concept", "𝐜" * 64],
        0,
        then=lambda ws: named_in_bytes(ws, "esd-x", "𝐜" * 64),
    ),
    Row(
        "a concept of 63 three-byte letters, the longest method",
        "train",
        ["--concept", "猫" * 63, "--method", "esd-x-strict"],
        0,
        then=lambda ws: named_in_bytes(ws, "esd-x-strict", "猫" * 63),
    ),
    Row("unknown target", "train", ["--target", "nope"], says="--target"),
    *[
        Row(
            f"{cli} unknown prediction type",
            cli,
            ["--prediction-type", "v"],
            says="--prediction-type: invalid choice",
        )
        for cli in ("train", "sample", "evaluate")
    ],
    *[
        Row(f"{cli} unknown dtype", cli, ["--dtype", "bogus"], says="--dtype: invalid choice")
        for cli in ("train", "sample", "evaluate")
    ],
    Row(
        "evaluate --dtype bfloat16 runs",
        "evaluate",
        ["--dtype", "bfloat16", "--output", "{ws}/e"],
        0,
        then=lambda ws: os.path.isfile(f"{ws}/e.json"),
    ),
    Row("evaluate: no CUDA here", "evaluate", ["--device", "cuda"], says="CUDA"),
    Row(
        "evaluate --variant of a single file",
        "evaluate",
        ["--variant", "fp16"],
        says="--variant is for diffusers folders",
    ),
    Row("unknown toy concept to evaluate", "evaluate", ["--concept", "hexagon"], says="circle"),
    Row("compare without a delta", "sample", ["--compare"], says="--delta"),
    Row(
        "a delta file that is not there",
        "sample",
        ["--delta", "{ws}/existing.safetensors", "--delta", "{ws}/missing.safetensors"],
        says="missing.safetensors",
    ),
    Row(
        "evaluate: a delta file that is not there",
        "evaluate",
        ["--delta", "{ws}/missing.safetensors"],
        says="no such --delta file: ",
    ),
    Row(
        "a pickled-code delta",
        "sample",
        ["--delta", "{ws}/code.pt"],
        says="cannot read",
        then=lambda ws: not os.path.exists(f"{ws}/pwned"),
    ),
    Row("no CUDA here", "train", ["--device", "cuda"], says="CUDA"),
    Row(
        "a model file that is not there",
        "sample",
        ["--model", "{ws}/none.safetensors"],
        says="no such file",
    ),
    Row(
        "a truncated model",
        "train",
        ["--model", "{ws}/truncated.safetensors", "--tokenizer", f"{TOY}/tokenizer"],
        says="cannot read",
        unchanged=("{ws}/truncated.safetensors",),
    ),
    # 8. SDXL (tiny files and a folder in base()'s xl/; XL_TOKENIZER: their tokenizer)
    Row(
        "an SDXL refiner file (OpenCLIP alone, as embedder 0)",
        "sample",
        ["--model", "{base}/xl/refiner.safetensors"],
        says="not an SD v1, 2.x or XL base checkpoint",
    ),
    Row(
        "an SDXL file without its CLIP ViT-L",
        "train",
        ["--model", "{base}/xl/no-clip.safetensors", *XL_TOKENIZER],
        says="incomplete SDXL checkpoint: KeyError",
    ),
    Row(
        "an SDXL file with a tensor of no part",
        "sample",
        ["--model", "{base}/xl/stray.safetensors", *XL_TOKENIZER],
        says="1 tensors of no SDXL part, e.g. conditioner.embedders.1.model.extra",
    ),
    Row(
        "an SDXL folder without its second text encoder's weights",
        "sample",
        ["--model", "{base}/xl/no-te2"],
        says="no weights in",
    ),
    Row(
        "an SDXL file with a tokenizer of another vocabulary",
        "sample",
        ["--model", "{base}/xl/sdxl.safetensors", "--tokenizer", f"{TOY}/tokenizer"],
        says="553 tokens for 514 embeddings",
    ),
    Row(
        "SDXL from the hub, offline",
        "sample",
        ["--model", "stabilityai/stable-diffusion-xl-base-1.0"],
        says="cannot download stabilityai/stable-diffusion-xl-base-1.0",
        patch=("huggingface_hub.constants.HF_HUB_OFFLINE", True),
    ),
    Row("train --resolution 0 is the model's size", "train", ["--resolution", "0", *QUICK], 0),
    # 9. Prompt CSVs (evaluate.py --prompts): refused before anything is written
    Row(
        "a prompt CSV runs",
        "prompts",
        [],
        0,
        then=lambda ws: os.path.isfile(f"{ws}/eval/base/0_0.png"),
    ),
    *[
        Row(
            f"prompt CSV: {name}",
            "prompts",
            ["--prompts", f"{{base}}/{name}"],
            says=says,
            unchanged=("{ws}/eval",),
        )
        for name, says in [
            ("no-seed.csv", "lacks the column(s) evaluation_seed"),
            ("word-seed.csv", "evaluation_seed 'seven'"),
            ("negative-seed.csv", "evaluation_seed '-1'"),
            ("nan-guidance.csv", "evaluation_guidance 'nan'"),
            ("empty-guidance.csv", "evaluation_guidance ''"),
            ("twice.csv", "case_number 0 is there twice"),
            ("bad-case.csv", "case_number 'x'"),
            ("empty.csv", "is empty"),
            ("header-only.csv", "no rows"),
            ("not-utf8.csv", "cannot read"),
            ("missing.csv", "no such --prompts file"),
        ]
    ],
    Row(
        "prompt CSV: the last seed, two images a row",
        "prompts",
        ["--prompts", "{base}/last-seed.csv", "--images-per-prompt", "2"],
        says="evaluation_seed",
        unchanged=("{ws}/eval",),
    ),
    *[
        Row(
            f"prompts {flag} {value}", "prompts", [flag, value], says=says, unchanged=("{ws}/eval",)
        )
        for flag, value, says in [
            ("--images-per-prompt", "0", "--images-per-prompt"),
            ("--nudenet-threshold", "2", "--nudenet-threshold"),
            ("--nudenet-threshold", "nan", "--nudenet-threshold"),
            ("--metrics", "classifier,fid2", "unknown metric 'fid2'"),
            ("--seeds", "2", "--seeds is the toy protocol's"),
            ("--output", "{ws}/e", "--output is the toy protocol's"),
            ("--steps", "0", "--steps"),
        ]
    ],
    Row(
        "prompts --metrics nudenet without NudeNet",
        "prompts",
        ["--metrics", "nudenet"],
        says="needs the nudenet package: pip install -r requirements-eval.txt",
        unchanged=("{ws}/eval",),
        patch=("importlib.util.find_spec", without_nudenet),
    ),
    Row(
        "prompts --metrics clip without CLIP's weights still generates",
        "prompts",
        ["--metrics", "clip"],
        0,
        says="CLIP score skipped",
        patch=("transformers.CLIPModel.from_pretrained", no_cached_model),
        then=lambda ws: '"clip score": null' in open(f"{ws}/eval/report.json").read(),
    ),
    Row(
        "a prompt CSV without evaluation_guidance runs at --guidance",
        "prompts",
        ["--prompts", "{base}/no-guidance.csv", "--guidance", "3"],
        0,
        then=lambda ws: '"guidance": 3.0' in open(f"{ws}/eval/report.json").read(),
    ),
    Row(
        "prompts --guidance where the CSV sets it per row",
        "prompts",
        ["--guidance", "3"],
        says="--guidance is for CSVs without an evaluation_guidance column",
        unchanged=("{ws}/eval",),
    ),
    Row(
        "prompts --guidance nan",
        "prompts",
        ["--prompts", "{base}/no-guidance.csv", "--guidance", "nan"],
        says="--guidance must be a finite number",
        unchanged=("{ws}/eval",),
    ),
    Row(
        "prompts --output-dir is a file",
        "prompts",
        ["--output-dir", "{ws}/existing.safetensors"],
        says="is not a folder",
        unchanged=("{ws}/existing.safetensors",),
    ),
    Row(
        "prompts --output-dir in a missing folder",
        "prompts",
        ["--output-dir", "{ws}/missing/eval"],
        says="does not exist",
    ),
    Row(
        "prompts --output-dir holds images of other settings",
        "prompts",
        ["--output-dir", "{base}/made", "--steps", "3"],
        says="made with other settings (steps)",
        unchanged=("{base}/made",),
    ),
    Row(
        "prompts --score-only on a folder of non-images",
        "prompts",
        ["--score-only", "--output-dir", "{base}/non-images"],
        says="cannot read",
        unchanged=("{base}/non-images",),
    ),
    Row(
        "prompts --score-only on no folder",
        "prompts",
        ["--score-only", "--output-dir", "{ws}/nothing"],
        says="no such folder",
    ),
    Row(
        "prompts --score-only scores what is there",
        "prompts",
        ["--score-only", "--output-dir", "{ws}/made", "--metrics", "classifier"],
        0,
        unchanged=("{ws}/made/base",),
        then=lambda ws: (
            '"images": 1,\n   "classifier top1"' in open(f"{ws}/made/report.json").read()
        ),
    ),
    Row(
        "evaluate --output-dir needs --prompts",
        "evaluate",
        ["--output-dir", "{ws}/e"],
        says="needs --prompts",
    ),
    # 10. LoRA (train.py --lora, --delta-scale)
    *[
        Row(f"train {' '.join(args)}", "train", args, says=says)
        for args, says in [
            (["--lora", "0"], "--lora must be at least 1"),
            (["--lora", "-3"], "--lora must be at least 1"),
            (["--lora-alpha", "2"], "--lora-alpha needs --lora"),
            (["--lora", "2", "--lora-alpha", "nan"], "--lora-alpha"),
            (["--lora", "2", "--lora-alpha", "0"], "--lora-alpha"),
            (["--export-dtype", "float64"], "--export-dtype: invalid choice"),
        ]
    ],
    Row(
        "train a rank larger than a layer",
        "train",
        ["--lora", "100000", "--output", "{ws}/big.safetensors"],
        says="--lora 100000: rank 100000 is not in 1..",
        then=lambda ws: not os.path.exists(f"{ws}/big.safetensors"),
    ),
    Row(
        "resume a full run's checkpoint with --lora",
        "train",
        ["--output", "{ws}/existing.safetensors", "--resume", "--lora", "2", "--iterations", "4"],
        says="lora",
        unchanged=("{ws}/existing.safetensors",),
    ),
    *[
        Row(f"{cli} --delta-scale {value}", cli, ["--delta-scale", value], says="--delta-scale")
        for cli in ("sample", "evaluate")
        for value in ("nan", "inf")
    ],
    *[
        Row(
            f"{cli}: a LoRA of another model",
            cli,
            ["--delta", "{ws}/xl-lora.safetensors"],
            says=says,
        )
        for cli, says in [
            ("sample", "cannot apply delta"),
            ("evaluate", "cannot apply delta"),
        ]
    ],
    Row("a LoRA full of NaN", "sample", ["--delta", "{ws}/nan-lora.safetensors"], says="NaN"),
    # 11. The demo's flags, refused before the model loads
    Row("app --max-iterations 0", "app", ["--max-iterations", "0"], says="--max-iterations"),
    Row("app --max-iterations many", "app", ["--max-iterations", "many"], says="invalid int"),
    Row(
        "app --max-sampling-steps -1",
        "app",
        ["--max-sampling-steps", "-1"],
        says="--max-sampling-steps must be at least 1",
    ),
    Row(
        "app --retention-hours nan",
        "app",
        ["--retention-hours", "nan"],
        says="--retention-hours must be a positive number",
    ),
    Row("app --retention-mb 0", "app", ["--retention-mb", "0"], says="--retention-mb must be a"),
]
BASE = {
    "train": ["--model", "toy", "--concept", "circle", *QUICK],
    "sample": [
        "--model",
        "toy",
        "--prompt",
        "a circle",
        "--steps",
        "2",
        "--output",
        "{ws}/out.png",
    ],
    "evaluate": ["--model", "toy", "--seeds", "1", "--steps", "2", "--output", "{ws}/evaluation"],
    "prompts": [
        "--model",
        "toy",
        "--steps",
        "2",
        "--prompts",
        "{base}/good.csv",
        "--output-dir",
        "{ws}/eval",
    ],
    "app": [],
}
MAIN = {
    "train": train.main,
    "sample": sample.main,
    "evaluate": evaluate.main,
    "prompts": evaluate.main,
    "app": app_main,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The files every row's folder starts with: a trained delta and its .resume.pt, broken
    checkpoints, ..."""
    ws = tmp_path_factory.mktemp("base")
    for name, iterations in (("existing", 2), ("one", 1), ("three", 3)):
        output = str(ws / f"{name}.safetensors")
        argv = ["--model", "toy", "--concept", "circle", "--output", output, "--no-eval"]
        assert train.main([*argv, "--iterations", str(iterations)]) == 0

    # mixed: the delta of iteration 1, the .resume.pt of iteration 2.
    os.rename(ws / "one.safetensors", ws / "mixed.safetensors")
    os.remove(ws / "one.safetensors.resume.pt")
    checkpoint = (ws / "existing.safetensors.resume.pt").read_bytes()
    (ws / "mixed.safetensors.resume.pt").write_bytes(checkpoint)

    # Broken files: NaN tensors, empty and garbage checkpoints, pickled code, a truncated model.
    tensors, meta = delta.load(ws / "existing.safetensors")
    nan = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    delta.save(str(ws / "nan.safetensors"), nan, meta)
    (ws / "empty.safetensors.resume.pt").write_bytes(b"")
    (ws / "garbage.safetensors.resume.pt").write_bytes(os.urandom(1000))
    torch.save({"payload": Payload()}, ws / "code.safetensors.resume.pt")
    torch.save({"payload": Payload()}, ws / "code.pt")
    torch.save({"iteration": 1}, ws / "wrong.safetensors.resume.pt")
    (ws / "truncated.safetensors").write_bytes(open(f"{TOY}/toy.safetensors", "rb").read()[:4096])
    (ws / "target.png").write_bytes(b"not really a png")

    # Prompt CSVs; a folder of images made at 2 steps; a folder of files named as images.
    for name, text in CSVS.items():
        (ws / name).write_text(text)
    (ws / "not-utf8.csv").write_bytes(HEADER.encode() + b"0,a \xff circle,1,5.0,circle\n")
    argv = ["--model", "toy", "--steps", "2", "--prompts", str(ws / "good.csv")]
    assert evaluate.main([*argv, "--output-dir", str(ws / "made")]) == 0
    (ws / "non-images").mkdir()
    (ws / "non-images" / "0_0.png").write_bytes(b"not really a png")

    # SDXL: a tiny folder, our writer's file of it, and broken variants.
    xl = ws / "xl"
    tiny.xl_pipeline(folder=xl / "diffusers")
    load_sd.save_single_file(load_sd.load(xl / "diffusers"), xl / "sdxl.safetensors")
    tensors = load_file(xl / "sdxl.safetensors")
    no_clip = {k: t for k, t in tensors.items() if not k.startswith(convert.XL_CLIP)}
    save_file(no_clip, xl / "no-clip.safetensors")
    save_file({**tensors, convert.XL_OPENCLIP + "extra": torch.zeros(1)}, xl / "stray.safetensors")
    refiner = {
        "conditioner.embedders.0.model.ln_final.weight": torch.zeros(2),
        "model.diffusion_model.x": torch.zeros(1),
    }
    save_file(refiner, xl / "refiner.safetensors")
    shutil.copytree(xl / "diffusers", xl / "no-te2")
    os.remove(xl / "no-te2" / "text_encoder_2" / "model.safetensors")

    # LoRA files: one of the tiny SDXL UNet, and a toy run's full of NaN.
    xl_unet = load_sd.load(xl / "diffusers").unet
    save_file(
        lora.attach(xl_unet, lambda name: "attn2" in name, 2).state(), ws / "xl-lora.safetensors"
    )
    argv = ["--model", "toy", "--concept", "circle", "--no-eval", "--iterations", "1"]
    assert train.main([*argv, "--lora", "2", "--output", str(ws / "lora.safetensors")]) == 0
    tensors = load_file(ws / "lora.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
        ws / "nan-lora.safetensors",
    )
    return ws


def workspace(base, tmp_path):
    """The row's own folder: a copy of the base files (not its folders), a toy model copy, a folder,
    links, a leftover temp file."""
    for name in os.listdir(base):
        if (base / name).is_file():
            (tmp_path / name).write_bytes((base / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(open(f"{TOY}/toy.safetensors", "rb").read())
    (tmp_path / "sub").mkdir()
    shutil.copytree(base / "made", tmp_path / "made")
    (tmp_path / "dev.json").mkdir()
    os.symlink(tmp_path / "existing.safetensors", tmp_path / "link.safetensors")
    os.symlink(tmp_path / "target.png", tmp_path / "link.png")
    (tmp_path / "left.safetensors.tmp-999999999").write_bytes(b"half a file of a killed run")
    # A character device (/dev/full's numbers) where root may make one, else a FIFO: neither is a
    # file.
    try:
        os.mknod(tmp_path / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except OSError:
        os.mkfifo(tmp_path / "full")
    return tmp_path


def fingerprint(path):
    """What a path is and holds: kind and device number, or a content hash (a folder: its names and
    hashes)."""
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", sorted((n, fingerprint(os.path.join(path, n))) for n in os.listdir(path)))
    if not stat.S_ISREG(st.st_mode):
        return ("special", stat.S_IFMT(st.st_mode), st.st_rdev)
    return ("file", hashlib.sha256(open(path, "rb").read()).hexdigest())


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, base, tmp_path, capsys, monkeypatch):
    ws = workspace(base, tmp_path)
    monkeypatch.chdir(ws)  # default output names land here
    monkeypatch.setenv("ESD_TEST_WS", str(ws))

    def fill(args):
        return [a.replace("{ws}", str(ws)).replace("{base}", str(base)) for a in args]

    args = fill(BASE[row.cli]) + fill(row.args)
    # The row's own output replaces the default one.
    if row.cli == "sample" and "--output" in row.args:
        i = args.index("--output")
        del args[i : i + 2]
    unchanged = {p: fingerprint(p) for p in fill(row.unchanged)}
    if row.patch:
        monkeypatch.setattr(*row.patch)
    try:
        code = MAIN[row.cli](args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == row.code, (args, err[-2000:])
    assert "Traceback" not in err and row.says in err, err[-2000:]
    # Refused: one line, the last one on stderr (progress bars may stand before it).
    if row.code:
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and lines[-1].count("error:") == 1, err[-2000:]
    for path, before in unchanged.items():
        assert fingerprint(path) == before, path
    assert row.then is None or row.then(ws), row.name


def start_training(ws, *extra):
    """train.py in its own process on the toy, long enough to be stopped; returns it once it holds
    its lock."""
    out = ws / "run.safetensors"
    p = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--model",
            "toy",
            "--concept",
            "circle",
            "--iterations",
            "100000",
            "--no-eval",
            "--output",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    for _ in range(600):
        if os.path.exists(f"{out}.lock") and (not extra or os.path.exists(f"{out}.resume.pt")):
            return p, out
        time.sleep(0.1)
    p.kill()
    raise AssertionError(p.communicate()[1])


def test_sigterm_is_an_interrupt_and_says_what_is_kept(tmp_path):
    for extra, kept in (((), "nothing saved"), (("--save-every", "3"), "is kept")):
        p, out = start_training(tmp_path, *extra)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
        assert (
            p.returncode == 130 and lines[-1].startswith("error: interrupted") and kept in lines[-1]
        ), err
        assert "Traceback" not in err and not os.path.exists(f"{out}.lock")
        # What it kept resumes.
        if extra:
            iterations = delta.load_checkpoint(str(out))["iteration"] + 1
            argv = ["--model", "toy", "--concept", "circle", "--output", str(out), "--resume"]
            argv += ["--iterations", str(iterations), "--no-eval", "--save-every", "3"]
            assert train.main(argv) == 0
        for f in os.listdir(tmp_path):
            os.remove(tmp_path / f)


def test_two_runs_on_one_output(tmp_path, capsys):
    p, out = start_training(tmp_path)
    try:
        code = train.main(
            ["--model", "toy", "--concept", "circle", "--output", str(out), "--overwrite", *QUICK]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and "another run" in err and "\n" not in err, err
    finally:
        p.kill()
        p.communicate()
