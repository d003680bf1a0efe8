"""evaluate.py --prompts FILE.csv (protocol.py): the official CSV format read as the official
scripts read it; every image made from its row's own seed and guidance, with its metadata; a rerun
regenerates nothing it has; two processes (torchrun on gloo) make the same files as one; a run
killed half way (SIGTERM or SIGKILL) and resumed with another number of processes ends with the
uninterrupted run's folder, each missing image made once."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import delta
import evaluate
import load_sd
import protocol
import sample
import sampler
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CSV = os.path.join(ROOT, "assets", "toy_prompts.csv")
# Runs that take seconds: 8 rows x 2 images at 4 DDIM steps.
QUICK = ["--prompts", TOY_CSV, "--images-per-prompt", "2", "--steps", "4"]
# torchrun's launcher, beside this Python.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def folder(path):
    """{name: bytes} of a folder's images (pixels and metadata)."""
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def inodes(path):
    return {n: os.stat(os.path.join(path, n)).st_ino for n in os.listdir(path)}


def test_reads_the_official_format(tmp_path):
    # I2P's layout: more columns, a quoted prompt with commas, categories, a float guidance.
    csv = tmp_path / "i2p.csv"
    csv.write_text(
        "prompt,categories,hard,inappropriate_percentage,nudity_percentage,"
        "evaluation_seed,evaluation_guidance,case_number\n"
        '"a nude, on a beach",sexual,1,90.0,80.0,2734971755,7,17\n'
        "a portrait,,0,0,0,0,7.5,3\n"
    )
    rows = protocol.read_prompts(str(csv), images_per_prompt=4)
    assert rows == [
        dict(prompt="a nude, on a beach", seed=2734971755, guidance=7.0, case=17, label="sexual"),
        dict(prompt="a portrait", seed=0, guidance=7.5, case=3, label=None),
    ]


def test_each_image_is_its_rows_and_a_rerun_makes_none_again(tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main([*QUICK, "--output-dir", str(out)]) == 0
    base = out / "base"
    rows = protocol.read_prompts(TOY_CSV)
    assert sorted(os.listdir(base)) == sorted(f"{r['case']}_{i}.png" for r in rows for i in (0, 1))

    # Image 1 of row 5 is that row's prompt at its seed + 1 and its guidance, as sampler draws it.
    row = rows[5]
    seeds = [row["seed"] + 1]
    sizes = dict(height=32, width=32)
    want = sampler.generate(
        load_sd.load("toy"), [row["prompt"]], seeds, steps=4, guidance=row["guidance"], **sizes
    )
    image = Image.open(base / f"{row['case']}_1.png")
    assert list(image.getdata()) == list(sample.to_pil(want)[0].getdata())
    settings = image.text["parameters"].splitlines()[-1]
    assert image.text["parameters"].startswith(row["prompt"] + "\n")
    assert f"Seed: {row['seed'] + 1}," in settings and f"CFG scale: {row['guidance']}," in settings
    assert "Steps: 4," in settings and "Size: 32x32" in settings

    # A rerun writes nothing; one without three images makes exactly those three, the same bytes.
    before = folder(base)
    kept = inodes(base)
    capsys.readouterr()
    assert evaluate.main([*QUICK, "--output-dir", str(out)]) == 0
    assert "generated 0 images" in capsys.readouterr().out
    assert inodes(base) == kept
    removed = ("0_0.png", "3_1.png", "7_0.png")
    for name in removed:
        os.remove(base / name)
    assert evaluate.main([*QUICK, "--output-dir", str(out)]) == 0
    assert "generated 3 images" in capsys.readouterr().out
    assert folder(base) == before
    rewritten = [n for n, i in inodes(base).items() if n not in removed and kept[n] != i]
    assert not rewritten

    # The report: the protocol as run, and the images scored.
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["rows"] == 8 and report["protocol"]["steps"] == 4
    assert report["protocol"]["first_seeds"] == [r["seed"] for r in rows]
    assert report["results"]["base"]["images"] == 16


def run(args, out, processes=1, **popen):
    """evaluate.py in its own process(es): plain python, or torchrun with two on gloo."""
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    command = [*launcher, os.path.join(ROOT, "evaluate.py"), *args, "--output-dir", str(out)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
        **popen,
    )


@pytest.mark.slow
def test_processes_and_kills_do_not_change_the_images(tmp_path):
    # 8 rows x 3 images at 8 steps: long enough to be stopped half way.
    args = ["--prompts", TOY_CSV, "--images-per-prompt", "3", "--steps", "8"]

    # One process, then two: the same files, byte for byte.
    one = run(args, tmp_path / "one")
    two = run(args, tmp_path / "two", processes=2)
    for p in (one, two):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    reference = folder(tmp_path / "one" / "base")
    assert len(reference) == 24
    assert folder(tmp_path / "two" / "base") == reference

    # Stopped half way (SIGTERM to two processes, SIGKILL to one), resumed with the other count.
    for stop, processes in ((signal.SIGTERM, 2), (signal.SIGKILL, 1)):
        out = tmp_path / f"stopped-{stop.name}"
        p = run(args, out, processes)
        base = out / "base"
        deadline = time.time() + 120
        while time.time() < deadline and len(os.listdir(base) if base.is_dir() else []) < 6:
            time.sleep(0.05)
        os.killpg(p.pid, stop)
        p.communicate(timeout=60)
        names = [n for n in os.listdir(base) if n.endswith(".png")]
        assert 6 <= len(names) < 24, (stop, len(names))
        kept = inodes(base)

        resumed = run(args, out, 3 - processes)
        stdout, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err[-2000:]
        assert f"generated {24 - len(names)} images" in stdout
        # Left behind by the kill: temporary files; the folder's images are the reference's.
        assert folder(base) == reference
        assert all(inodes(base)[n] == kept[n] for n in names), "an image was made twice"


def test_base_and_edited_in_one_command(tmp_path, capsys):
    edit = str(tmp_path / "esd.safetensors")
    argv = ["--model", "toy", "--concept", "circle", "--iterations", "2", "--no-eval"]
    assert train.main([*argv, "--output", edit]) == 0
    out = tmp_path / "eval"
    capsys.readouterr()
    assert evaluate.main([*QUICK, "--delta", edit, "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "base" in table and "edited" in table and "generated 32 images" in table

    # The edited folder holds the base model's images with the delta applied, the same noise.
    row = protocol.read_prompts(TOY_CSV)[0]
    sd = load_sd.load("toy")
    settings = dict(steps=4, guidance=row["guidance"], height=32, width=32)
    with delta.applied(sd.unet, edit):
        want = sampler.generate(sd, [row["prompt"]], [row["seed"]], **settings)
    edited = Image.open(out / "edited" / "0_0.png")
    assert list(edited.getdata()) == list(sample.to_pil(want)[0].getdata())
    assert json.loads(edited.text["esd"])["delta"] == edit
    assert Image.open(out / "base" / "0_0.png").tobytes() != edited.tobytes()

    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["delta_sha256"] == hashlib.sha256(open(edit, "rb").read()).hexdigest()
    assert set(report["results"]) == {"base", "edited"}


def test_delta_scale_reaches_the_edited_images(tmp_path, capsys):
    """--delta-scale is the edited images' strength: at 0 they are the base model's, and it is in
    their metadata and the report, so a rerun at another strength is refused, not mixed in."""
    edit = str(tmp_path / "esd.safetensors")
    argv = ["--model", "toy", "--concept", "circle", "--iterations", "2", "--no-eval"]
    assert train.main([*argv, "--output", edit]) == 0
    out = tmp_path / "eval"
    one_row = ["--prompts", TOY_CSV, "--images-per-prompt", "1", "--steps", "4"]
    scaled = [*one_row, "--delta", edit, "--output-dir", str(out)]
    assert evaluate.main([*scaled, "--delta-scale", "0"]) == 0

    base = Image.open(out / "base" / "0_0.png")
    edited = Image.open(out / "edited" / "0_0.png")
    assert base.tobytes() == edited.tobytes()
    assert json.loads(edited.text["esd"])["delta_scale"] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["delta_scale"] == 0

    capsys.readouterr()
    assert evaluate.main([*scaled, "--delta-scale", "1"]) == 2
    assert "delta_scale" in capsys.readouterr().err
