"""train.py end to end on a tiny random SD folder: the CLI runs, only the chosen weights change, the
delta and the exports load back (ours, diffusers), --resume repeats an uninterrupted run exactly,
a NaN loss stops cleanly, and bad input is one line with exit code 2."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline

import delta
import esd
import load_sd
import sample
import sampler
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--resolution", "16", "--steps", "4", "--device", "cpu", "--lr", "1e-3"]
# sample.py at the same small size, one DDIM step
SAMPLE_FAST = ["--steps", "1", "--height", "16", "--width", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return str(tiny_sd.folder)


def train_argv(model, out, *args):
    return ["--model", model, "--concept", "car", "--output", str(out), *FAST, *map(str, args)]


def run_train(model, out, *args):
    """train.py's CLI, as `python train.py` runs it: its exit code."""
    return train.main(train_argv(model, out, *args))


def train_with(model, out, *args, **kwargs):
    """train.train on the same settings as run_train, with train()'s keyword arguments."""
    config = train.parse_args(train_argv(model, out, *args))
    return train.train(config, load_sd.load(model), ["car"], **kwargs), config


def recording(source_class, seen):
    """A subclass of an x_t source class that appends each draw (concept indices, t_enc, x_t) to
    `seen`: train.train(..., xt_source=recording(esd.PaperXt, seen))."""

    class Recording(source_class):
        def draw(self, it):
            drawn = super().draw(it)
            seen.append(drawn)
            return drawn

    return Recording


def test_cli_end_to_end_changes_only_cross_attention(model, tmp_path):
    out = tmp_path / "car.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--model",
            model,
            "--concept",
            "car",
            "--iterations",
            "3",
            "--output",
            out,
            *FAST,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 0, r.stderr
    tensors, meta = delta.load(str(out))
    base = load_sd.load(model).unet.state_dict()
    assert set(tensors) == {k for k in base if "attn2" in k}
    assert all(not torch.equal(tensors[k], base[k]) for k in tensors), "every trained tensor moved"
    written = (meta["concept"], meta["method"], meta["iterations"], meta["base_model"])
    assert written == ("car", "esd-x", "3", model)


def test_exports_load_back_everywhere(model, tmp_path):
    out = tmp_path / "d.safetensors"
    full = tmp_path / "full.safetensors"
    folder = tmp_path / "diffusers"
    exports = ["--export-full", full, "--export-diffusers", folder]
    assert run_train(model, out, "--iterations", 2, *exports) == 0

    # The delta applied to the base model
    edited = load_sd.load(model)
    delta.apply(edited.unet, delta.load(str(out))[0])
    x = torch.randn(1, 4, 8, 8)
    context = edited.encode_prompts(["car"])
    with torch.no_grad():
        want = edited.unet(x, 500, context)

        # == the official single file, loaded by ours
        single = load_sd.load(str(full), tokenizer=f"{model}/tokenizer")
        torch.testing.assert_close(single.unet(x, 500, context), want)

        # == the diffusers folder, loaded by diffusers
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
        torch.testing.assert_close(pipe.unet(x, 500, context).sample, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(pipe.scheduler.alphas_cumprod, sampler.alphas_cumprod())


def test_interrupted_run_resumes_to_the_uninterrupted_result(model, tmp_path):
    """Ctrl-C in the middle of the 4th iteration (the CLI's exit code 130 and message for it:
    tests/test_bad_input.py); --resume from the last checkpoint ends where an uninterrupted run
    does."""
    whole = tmp_path / "whole.safetensors"
    parts = tmp_path / "parts.safetensors"
    assert run_train(model, whole, "--iterations", 5) == 0

    # The default x_t source (a trajectory pool), interrupted as it draws iteration 3's x_t
    class InterruptedPool(esd.TrajectoryPool):
        def draw(self, it):
            if it == 3:
                raise KeyboardInterrupt
            return super().draw(it)

    with pytest.raises(KeyboardInterrupt):
        train_with(model, parts, "--iterations", 5, "--save-every", 2, xt_source=InterruptedPool)
    config = train.parse_args(train_argv(model, parts, "--iterations", 5, "--save-every", 2))
    assert "--resume" in train.kept(config)
    # the last checkpoint
    assert delta.load(str(parts))[1]["iterations"] == "2"

    assert run_train(model, parts, "--iterations", 5, "--resume") == 0
    a = delta.load(str(whole))[0]
    b = delta.load(str(parts))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # other settings: refused
    assert run_train(model, parts, "--iterations", 6, "--resume", "--seed", 1) == 2


def test_nan_loss_stops_and_keeps_the_last_checkpoint(model, tmp_path, capsys):
    out = tmp_path / "nan.safetensors"
    # lr 1e30: the first step is finite, the weights it makes overflow the next forward pass
    assert run_train(model, out, "--iterations", 5, "--save-every", 1, "--lr", 1e30) == 1
    # the progress bar's lines, then one error line
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: loss is nan") and "Traceback" not in err, err
    tensors, meta = delta.load(str(out))
    assert int(meta["iterations"]) >= 1 and all(torch.isfinite(t).all() for t in tensors.values())


def test_bad_input_is_one_line_exit_2(model, tmp_path, capsys):
    cases = [
        ["--concept", " , "],
        ["--output", tmp_path / "missing" / "d.safetensors"],
        ["--target", "nope"],
        ["--steps", "1000"],
        ["--variant", "fp16"],
        ["--resolution", "12"],
        ["--batch-size", "0"],
        ["--model", tmp_path / "none.safetensors"],
    ]
    for case in cases:
        assert train.main(["--model", model, "--concept", "car", *FAST, *map(str, case)]) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (case, err)
    # argparse: unknown method, its valid choices listed
    with pytest.raises(SystemExit) as e:
        train.main(["--concept", "car", "--method", "esd-q"])
    assert e.value.code == 2 and "esd-x" in capsys.readouterr().err


def test_delta_for_another_architecture_is_refused(model, tmp_path, capsys):
    # SD v1's to_k width: not the tiny model's
    other = tmp_path / "other.safetensors"
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    delta.save(str(other), {name: torch.zeros(320, 768)}, {"concept": "car"})
    output = ["--output", str(tmp_path / "x.png")]
    code = sample.main(
        ["--model", model, "--prompt", "car", "--delta", str(other), *SAMPLE_FAST, *output]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot apply delta") and "\n" not in err, err


def test_official_style_pt_delta_applies(model, tmp_path):
    """Older official ESD releases ship a whole diffusers-named UNet state dict as .pt; it applies
    by identity, and a .pt holding pickled code is refused (weights_only)."""
    unet = load_sd.load(model).unet
    full = {k: v + 1 for k, v in unet.state_dict().items()}
    torch.save(full, tmp_path / "official.pt")
    delta.apply(unet, delta.load(str(tmp_path / "official.pt"))[0])
    assert all(torch.equal(unet.state_dict()[k], full[k]) for k in full)

    # a module: pickled code
    pickled = tmp_path / "pickled.pt"
    torch.save({"x": torch.nn.Linear(1, 1)}, pickled)
    output = ["--output", str(tmp_path / "x.png")]
    code = sample.main(
        ["--model", model, "--prompt", "car", "--delta", str(pickled), *SAMPLE_FAST, *output]
    )
    assert code == 2


def test_compare_grid_has_original_and_erased_rows(model, tmp_path):
    out = tmp_path / "d.safetensors"
    assert run_train(model, out, "--iterations", 2, "--lr", 1e-1) == 0
    prompts = ["--prompt", "car", "--prompt", "a car"]
    args = ["--model", model, *prompts, *SAMPLE_FAST, "--steps", "2", "--seed", "5"]
    assert sample.main([*args, "--output", str(tmp_path / "plain.png")]) == 0
    compare = ["--delta", str(out), "--compare"]
    assert sample.main([*args, "--output", str(tmp_path / "grid.png"), *compare]) == 0
    import numpy as np
    from PIL import Image

    # 16-px images enlarged 6x (nearest neighbour: every 6th pixel is the image)
    g = np.asarray(Image.open(tmp_path / "grid.png"))
    assert g.shape == (2 * sample.MIN_CELL, 2 * sample.MIN_CELL, 3)
    g = g[::6, ::6]

    # top row: exactly what the unedited model draws; bottom row: something else
    for j in range(2):
        plain = np.asarray(Image.open(tmp_path / f"plain-{j}.png"))
        assert np.array_equal(g[:16, 16 * j : 16 * (j + 1)], plain)
    assert not np.array_equal(g[:16], g[16:])


def test_batch_size_adds_x_t_at_the_same_t_enc(model, tmp_path):
    # The paper's x_t (--trajectory-pool 0), batch 1 and batch 3
    seen = []
    paper = ["--iterations", 1, "--trajectory-pool", 0]
    xt_source = recording(esd.PaperXt, seen)
    train_with(model, tmp_path / "b1.safetensors", *paper, xt_source=xt_source)
    train_with(model, tmp_path / "b3.safetensors", *paper, "--batch-size", 3, xt_source=xt_source)
    (indices_1, t_1, x_1), (indices_3, t_3, x_3) = seen
    assert len(indices_1) == 1 and len(indices_3) == 3 and x_3.shape[0] == 3

    # the batch-1 run's x_t is the first of the three, at the same t_enc
    assert t_3 == t_1
    torch.testing.assert_close(x_3[:1], x_1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_3[1], x_3[0]) and not torch.allclose(x_3[2], x_3[1])

    # A trajectory pool (the default): N per batch row, consecutive entries, each its own trajectory
    seen.clear()
    xt_source = recording(esd.TrajectoryPool, seen)
    pooled = ["--iterations", 2, "--batch-size", 2]
    train_with(model, tmp_path / "p.safetensors", *pooled, xt_source=xt_source)
    (_, _, x_a), (_, _, x_b) = seen
    assert len(x_a) == len(x_b) == 2 and not torch.allclose(x_a[0], x_a[1])
    message = "4 entries: no row read twice"
    assert not any(torch.allclose(a, b) for a in x_a for b in x_b), message


def test_a_target_variant_is_one_function_and_one_dict_entry(model, tmp_path, monkeypatch):
    """docs/cli.md's recipe for a loss variant ("Your own target"): a function added to
    esd.TARGETS, picked by --target NAME, is what trains. (The test adds it for its own run.)"""

    # pull toward e_0 alone: eta = 0
    def no_guidance(e_0, e_c, negative_guidance, e_a=None):
        return e_0 if e_a is None else e_a

    monkeypatch.setitem(esd.TARGETS, "no-guidance", no_guidance)
    variant = tmp_path / "variant.safetensors"
    eta_0 = tmp_path / "eta0.safetensors"
    eta_1 = tmp_path / "eta1.safetensors"
    assert run_train(model, variant, "--iterations", 2, "--target", "no-guidance") == 0
    assert run_train(model, eta_0, "--iterations", 2, "--negative-guidance", 0) == 0
    assert run_train(model, eta_1, "--iterations", 2) == 0

    variant_tensors, meta = delta.load(variant)
    eta_0_tensors = delta.load(eta_0)[0]
    eta_1_tensors = delta.load(eta_1)[0]
    assert meta["target"] == "no-guidance"
    # the same target, the same weights; and the default is another target
    assert all(torch.equal(variant_tensors[k], eta_0_tensors[k]) for k in variant_tensors)
    assert not all(torch.equal(variant_tensors[k], eta_1_tensors[k]) for k in variant_tensors)


def test_on_step_sees_every_step_and_can_stop_the_run_saved(model, tmp_path):
    """The demo's hook: on_step(iteration, loss) after each step; True stops there, saved like
    --iterations 3."""
    three = tmp_path / "three.safetensors"
    stopped = tmp_path / "stopped.safetensors"
    assert run_train(model, three, "--iterations", 3) == 0
    seen = []

    def on_step(it, loss):
        seen.append((it, loss))
        return it == 3

    train_with(model, stopped, "--iterations", 5, on_step=on_step)
    assert [it for it, _ in seen] == [1, 2, 3] and all(loss > 0 for _, loss in seen)
    a, meta = delta.load(stopped)
    b = delta.load(three)[0]
    assert meta["iterations"] == "3" and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_between_the_two_writes_resumes_exactly(model, tmp_path, monkeypatch):
    """A kill after .resume.pt is written and before its delta is (delta.save_checkpoint writes
    .resume.pt first) leaves a .resume.pt newer than its delta: --resume continues from the newer
    .resume.pt and ends with the weights of an uninterrupted run (the pair is never mixed)."""
    whole = tmp_path / "whole.safetensors"
    assert run_train(model, whole, "--iterations", 6) == 0

    # The kill: the second delta write (iteration 4's; .resume.pt goes through torch.save) is
    # interrupted inside safetensors, the library that writes it
    parts = tmp_path / "parts.safetensors"
    write_delta = safetensors.torch.serialize_file
    writes = []

    def killed_on_the_second(*args, **kwargs):
        writes.append(args)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return write_delta(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        train_with(model, parts, "--iterations", 6, "--save-every", 2)
    monkeypatch.undo()

    # Left behind: iteration 2's delta beside iteration 4's .resume.pt
    assert delta.load(parts)[1]["iterations"] == "2"
    assert delta.load_checkpoint(str(parts))["iteration"] == 4

    assert run_train(model, parts, "--iterations", 6, "--save-every", 2, "--resume") == 0
    a = delta.load(whole)[0]
    b = delta.load(parts)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_pool_0_is_the_papers_algorithm(model, tmp_path):
    """--trajectory-pool 0, the paper's x_t: every iteration samples afresh, t_enc DDIM steps from
    its own noise with the weights as they are at that iteration (Algorithm 1). The CLI's weights
    equal this loop's, step by step."""
    out = tmp_path / "paper.safetensors"
    paper = ["--trajectory-pool", 0, "--pool-refresh", 0]
    assert run_train(model, out, "--iterations", 4, *paper) == 0

    sd = load_sd.load(model)
    trainer = esd.ESD(sd.unet, "esd-x", steps=4)
    optimizer = torch.optim.Adam(trainer.params.values(), lr=1e-3)
    uncond, cond = sd.encode_prompts(["", "car"]).split(1)
    for it in range(4):
        # the iteration's (concept index, t_enc, noise seed): one concept, 4 DDIM steps, seed 0
        _, t_enc, noise_seed = esd.draw(0, "iteration", it, 1, 4)
        generator = torch.Generator().manual_seed(noise_seed)
        x_T = torch.randn((1, *sd.latent_shape(16, 16)), generator=generator)

        # x_t from the model being trained, now
        x_t = trainer.sample(x_T, cond, uncond, t_enc)
        trainer.loss(x_t, t_enc, cond, uncond).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = delta.load(out)[0]
    message = "the same x_t and weights"
    assert all(torch.equal(trained[k], p) for k, p in trainer.delta().items()), message
