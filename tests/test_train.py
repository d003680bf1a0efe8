"""train.py end to end on a tiny random SD folder: the CLI runs, only the chosen weights change, the
delta and the exports load back (ours, diffusers), --resume repeats an uninterrupted run exactly,
a NaN loss stops cleanly, and bad input is one line with exit code 2."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

import delta
import esd
import load_sd
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--resolution", "16", "--steps", "4", "--device", "cpu", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return str(tiny_sd.folder)


def run_train(model, out, *args):
    return train.main(
        ["--model", model, "--concept", "car", "--output", str(out), *FAST, *map(str, args)]
    )


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
    assert (meta["concept"], meta["method"], meta["iterations"], meta["base_model"]) == (
        "car",
        "esd-x",
        "3",
        model,
    )


def test_exports_load_back_everywhere(model, tmp_path):
    out, full, folder = (
        tmp_path / "d.safetensors",
        tmp_path / "full.safetensors",
        tmp_path / "diffusers",
    )
    assert (
        run_train(
            model, out, "--iterations", 2, "--export-full", full, "--export-diffusers", folder
        )
        == 0
    )
    edited = load_sd.load(model)
    delta.apply(edited.unet, delta.load(str(out))[0])
    x, context = torch.randn(1, 4, 8, 8), edited.encode_prompts(["car"])
    with torch.no_grad():
        want = edited.unet(x, 500, context)
        torch.testing.assert_close(
            load_sd.load(str(full), tokenizer=f"{model}/tokenizer").unet(x, 500, context), want
        )
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
        torch.testing.assert_close(pipe.unet(x, 500, context).sample, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(pipe.scheduler.alphas_cumprod, __import__("sampler").alphas_cumprod())


def test_interrupted_run_resumes_to_the_uninterrupted_result(model, tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole.safetensors", tmp_path / "parts.safetensors"
    assert run_train(model, whole, "--iterations", 5) == 0
    loss, calls = esd.ESD.loss, []

    def interrupted_at_iteration_3(
        self, *args, **kwargs
    ):  # Ctrl-C in the middle of the 4th iteration
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(esd.ESD, "loss", interrupted_at_iteration_3)
    assert run_train(model, parts, "--iterations", 5, "--save-every", 2) == 130
    assert "--resume" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.undo()
    assert delta.load(str(parts))[1]["iterations"] == "2"  # the last checkpoint
    assert run_train(model, parts, "--iterations", 5, "--resume") == 0
    a, b = delta.load(str(whole))[0], delta.load(str(parts))[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        run_train(model, parts, "--iterations", 6, "--resume", "--seed", 1) == 2
    )  # other settings: refused


def test_nan_loss_stops_and_keeps_the_last_checkpoint(model, tmp_path, capsys):
    out = tmp_path / "nan.safetensors"
    # lr 1e30: the first step is finite, the weights it makes overflow the next forward pass
    assert run_train(model, out, "--iterations", 5, "--save-every", 1, "--lr", 1e30) == 1
    err = capsys.readouterr().err.strip()  # the progress bar's lines, then one error line
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
    with pytest.raises(SystemExit) as e:  # argparse: unknown method, its valid choices listed
        train.main(["--concept", "car", "--method", "esd-q"])
    assert e.value.code == 2 and "esd-x" in capsys.readouterr().err


def test_delta_for_another_architecture_is_refused(model, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    delta.save(
        str(other),
        {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
                320, 768
            )
        },
        {"concept": "car"},
    )
    code = sample.main(
        [
            "--model",
            model,
            "--prompt",
            "car",
            "--delta",
            str(other),
            "--steps",
            "1",
            "--height",
            "16",
            "--width",
            "16",
            "--output",
            str(tmp_path / "x.png"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot apply delta") and "\n" not in err, err


def test_official_style_pt_delta_applies(model, tmp_path):
    """Older official ESD releases ship a whole diffusers-named UNet state dict as .pt; it applies by
    identity, and a .pt holding pickled code is refused (weights_only)."""
    unet = load_sd.load(model).unet
    full = {k: v + 1 for k, v in unet.state_dict().items()}
    torch.save(full, tmp_path / "official.pt")
    delta.apply(unet, delta.load(str(tmp_path / "official.pt"))[0])
    assert all(torch.equal(unet.state_dict()[k], full[k]) for k in full)
    torch.save({"x": torch.nn.Linear(1, 1)}, tmp_path / "pickled.pt")  # a module: pickled code
    code = sample.main(
        [
            "--model",
            model,
            "--prompt",
            "car",
            "--delta",
            str(tmp_path / "pickled.pt"),
            "--steps",
            "1",
            "--height",
            "16",
            "--width",
            "16",
            "--output",
            str(tmp_path / "x.png"),
            "--device",
            "cpu",
        ]
    )
    assert code == 2


def test_compare_grid_has_original_and_erased_rows(model, tmp_path):
    out = tmp_path / "d.safetensors"
    assert run_train(model, out, "--iterations", 2, "--lr", 1e-1) == 0
    args = [
        "--model",
        model,
        "--prompt",
        "car",
        "--prompt",
        "a car",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--device",
        "cpu",
        "--seed",
        "5",
    ]
    assert sample.main([*args, "--output", str(tmp_path / "plain.png")]) == 0
    assert (
        sample.main(
            [*args, "--output", str(tmp_path / "grid.png"), "--delta", str(out), "--compare"]
        )
        == 0
    )
    import numpy as np
    from PIL import Image

    g = np.asarray(Image.open(tmp_path / "grid.png"))
    assert g.shape == (2 * sample.MIN_CELL, 2 * sample.MIN_CELL, 3)  # 16-px images enlarged 6x
    g = g[::6, ::6]  # nearest-neighbour enlargement: every 6th pixel is the image
    for j in range(2):  # top row: exactly what the unedited model draws; bottom row: something else
        assert np.array_equal(
            g[:16, 16 * j : 16 * (j + 1)], np.asarray(Image.open(tmp_path / f"plain-{j}.png"))
        )
    assert not np.array_equal(g[:16], g[16:])


def test_batch_size_adds_x_t_at_the_same_t_enc(model, tmp_path, monkeypatch):
    seen, loss = [], esd.ESD.loss

    def recording(self, x_t, t_enc, cond, uncond, anchor=None):
        assert len(cond) == len(x_t) and len(uncond) == 1
        seen.append((x_t, t_enc))
        return loss(self, x_t, t_enc, cond, uncond, anchor)

    monkeypatch.setattr(esd.ESD, "loss", recording)
    assert (
        run_train(model, tmp_path / "b1.safetensors", "--iterations", 1, "--trajectory-pool", 0)
        == 0
    )
    assert (
        run_train(
            model,
            tmp_path / "b3.safetensors",
            "--iterations",
            1,
            "--batch-size",
            3,
            "--trajectory-pool",
            0,
        )
        == 0
    )
    (x1, t1), (x3, t3) = seen
    assert x3.shape[0] == 3 and t3 == t1  # the batch-1 run's x_t is the first of the three
    torch.testing.assert_close(x3[:1], x1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x3[1], x3[0]) and not torch.allclose(x3[2], x3[1])
    seen.clear()  # a trajectory pool (the default): N per batch row, consecutive entries, each its own trajectory
    assert run_train(model, tmp_path / "p.safetensors", "--iterations", 2, "--batch-size", 2) == 0
    assert [len(x) for x, _ in seen] == [2, 2] and not torch.allclose(seen[0][0][0], seen[0][0][1])
    assert not any(torch.allclose(a, b) for a in seen[0][0] for b in seen[1][0]), (
        "4 entries: no row read twice"
    )


def test_a_target_variant_is_one_function_and_one_dict_entry(model, tmp_path, monkeypatch):
    """The README's recipe for a loss variant: a function in esd.TARGETS, picked by --target NAME, is what trains."""

    def no_guidance(e_0, e_c, negative_guidance, e_a=None):  # pull toward e_0 alone: eta = 0
        return e_0 if e_a is None else e_a

    monkeypatch.setitem(esd.TARGETS, "no-guidance", no_guidance)
    assert (
        run_train(
            model, tmp_path / "variant.safetensors", "--iterations", 2, "--target", "no-guidance"
        )
        == 0
    )
    assert (
        run_train(model, tmp_path / "eta0.safetensors", "--iterations", 2, "--negative-guidance", 0)
        == 0
    )
    assert run_train(model, tmp_path / "eta1.safetensors", "--iterations", 2) == 0
    (variant, meta), reference, eta1 = (
        delta.load(tmp_path / f)
        for f in ("variant.safetensors", "eta0.safetensors", "eta1.safetensors")
    )
    assert meta["target"] == "no-guidance"
    assert all(
        torch.equal(variant[k], reference[0][k]) for k in variant
    )  # the same target, the same weights
    assert not all(
        torch.equal(variant[k], eta1[0][k]) for k in variant
    )  # and the default is another target


def test_on_step_sees_every_step_and_can_stop_the_run_saved(model, tmp_path):
    """The demo's hook: on_step(iteration, loss) after each step; True stops there, saved like --iterations 3."""
    three, stopped = tmp_path / "three.safetensors", tmp_path / "stopped.safetensors"
    assert run_train(model, three, "--iterations", 3) == 0
    config = train.parse_args(
        ["--model", model, "--concept", "car", "--output", str(stopped), "--iterations", "5", *FAST]
    )
    seen = []
    train.train(
        config,
        load_sd.load(model),
        ["car"],
        on_step=lambda it, loss: seen.append((it, loss)) or it == 3,
    )
    assert [it for it, _ in seen] == [1, 2, 3] and all(loss > 0 for _, loss in seen)
    (a, meta), (b, _) = delta.load(stopped), delta.load(three)
    assert meta["iterations"] == "3" and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_between_the_two_writes_resumes_exactly(model, tmp_path, monkeypatch):
    """A kill after .resume.pt is written and before its delta is: --resume continues from the newer .resume.pt
    and ends with the weights of an uninterrupted run (the pair is never mixed)."""
    whole, parts = tmp_path / "whole.safetensors", tmp_path / "parts.safetensors"
    assert run_train(model, whole, "--iterations", 6) == 0
    write_delta, calls = delta.save, []

    def killed_on_the_second_delta(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # iteration 4's .resume.pt is on disk, its delta not yet
            raise KeyboardInterrupt
        return write_delta(*args, **kwargs)

    monkeypatch.setattr(delta, "save", killed_on_the_second_delta)
    assert run_train(model, parts, "--iterations", 6, "--save-every", 2) == 130
    monkeypatch.undo()
    assert (
        delta.load(parts)[1]["iterations"] == "2"
        and delta.load_checkpoint(str(parts))["iteration"] == 4
    )
    assert run_train(model, parts, "--iterations", 6, "--save-every", 2, "--resume") == 0
    a, b = delta.load(whole)[0], delta.load(parts)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_pool_0_is_the_papers_algorithm(model, tmp_path):
    """--trajectory-pool 0, the paper's x_t: every iteration samples afresh, t_enc DDIM steps from its own noise
    with the weights as they are at that iteration (Algorithm 1). The CLI's weights equal this loop's, step by step."""
    out = tmp_path / "paper.safetensors"
    assert (
        run_train(model, out, "--iterations", 4, "--trajectory-pool", 0, "--pool-refresh", 0) == 0
    )
    sd = load_sd.load(model)
    trainer = esd.ESD(sd.unet, "esd-x", steps=4)
    optimizer = torch.optim.Adam(trainer.params.values(), lr=1e-3)
    uncond, cond = sd.encode_prompts(["", "car"]).split(1)
    draws = esd.XtSource(
        trainer, [cond], uncond, None, seed=0
    )  # its (concept, t_enc, noise seed) per iteration
    for it in range(4):
        _, t_enc, noise_seed = draws._draw("iteration", it)
        x_T = torch.randn(
            (1, *sd.latent_shape(16, 16)), generator=torch.Generator().manual_seed(noise_seed)
        )
        x_t = trainer.sample(x_T, cond, uncond, t_enc)  # the model being trained, now
        trainer.loss(x_t, t_enc, cond, uncond).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = delta.load(out)[0]
    assert all(torch.equal(trained[k], p) for k, p in trainer.delta().items()), (
        "the same x_t and weights"
    )
