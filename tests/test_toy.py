"""The toy world: its data and tokenizer are what toy.py says, the VAE rescaling is exact, the
shipped model in assets/toy/ loads offline through the official single-file path and draws what it
is asked for, its classifier is accurate on held-out data, and evaluate.py measures and leaves the
UNet as it was."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import delta
import evaluate
import files
import load_sd
import sample
import sampler
import toy
from vae import VAE, VAEConfig


@pytest.fixture(scope="module")
def sd():
    return load_sd.load("toy")


def test_render_draws_the_shape_in_its_color():
    centre = torch.tensor([16.0])
    r = torch.tensor([8.0])
    # from the shape definitions in toy.SHAPES
    areas = {
        "circle": math.pi * 8**2,
        "square": (2 * 0.85 * 8) ** 2,
        "triangle": 0.5 * 16 * 1.8 * 8,
        "cross": 2 * (2 * 8) * (2 * 8 / 3) - (2 * 8 / 3) ** 2,
    }
    for k, (name, area) in enumerate(areas.items()):
        for c, rgb in enumerate(toy.COLORS.values()):
            image = toy.render(torch.tensor([k]), torch.tensor([c]), centre, centre, r)[0]
            # per channel: the shape's coverage, to 4x4 sub-pixels
            cover = (image + 1) / 2 / torch.tensor(rgb)[:, None, None]
            assert cover.sum(dim=(1, 2)).sub(area).abs().max() < 0.03 * area, (name, c)
            # the centre is inside
            torch.testing.assert_close(image[:, 16, 16], torch.tensor(rgb) * 2 - 1)


def test_dataset_is_deterministic_and_in_range():
    images, shapes, colors = toy.make_dataset(256, seed=3)
    again = toy.make_dataset(256, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((images, shapes, colors), again))
    assert not torch.equal(images, toy.make_dataset(256, seed=4)[0])
    assert images.shape == (256, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert set(shapes.tolist()) == {0, 1, 2, 3} and set(colors.tolist()) == {0, 1, 2, 3}
    # every shape lies wholly inside the image
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 0], images[..., -1]], -1)
    assert (border == -1).all()


def test_captions_follow_the_labels():
    shapes = torch.randint(4, (4000,))
    colors = torch.randint(4, (4000,))
    texts = toy.captions(shapes, colors, torch.Generator().manual_seed(0))
    assert texts == toy.captions(shapes, colors, torch.Generator().manual_seed(0))
    assert abs(texts.count("") / len(texts) - toy.CAPTION_KINDS["empty"]) < 0.02
    for text, s, c in zip(texts, shapes.tolist(), colors.tolist()):
        words = text.split()
        assert set(words) <= set(toy.WORDS)
        assert set(words) & set(toy.SHAPES) <= {list(toy.SHAPES)[s]}
        assert set(words) & set(toy.COLORS) <= {list(toy.COLORS)[c]}
    assert {"circle", "a circle", "a red circle", "red circle", "a red shape"} <= set(texts)


def test_tokenizer_round_trip(tmp_path):
    tok = toy.write_tokenizer(tmp_path)
    assert all(len(tok.tokenize(w)) == 1 for w in toy.WORDS)
    ids = tok("a yellow triangle").input_ids
    assert ids == [
        tok.bos_token_id,
        *tok.convert_tokens_to_ids(["a</w>", "yellow</w>", "triangle</w>"]),
        tok.eos_token_id,
    ]
    # any word encodes, byte by byte
    for text in ("a yellow triangle", "a purple hexagon"):
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    reloaded = type(tok).from_pretrained(tmp_path)
    assert reloaded("a green cross").input_ids == tok("a green cross").input_ids
    assert len(reloaded) == len(tok)


def test_standardize_is_exact_and_makes_unit_latents():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**toy.VAE_CONFIG)).eval().requires_grad_(False)
    images = toy.make_dataset(32, 0)[0]
    z = toy.encode(vae, images)
    decoded = vae.decode(z)

    toy.standardize(vae, images)
    z_new = toy.encode(vae, images)
    # the same decoder, reparametrised
    torch.testing.assert_close(vae.decode(z_new), decoded, atol=1e-5, rtol=1e-4)
    u = z_new * vae.config.scaling_factor  # what the UNet sees
    torch.testing.assert_close(u.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(u.std((0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)


def test_training_stages_are_reproducible():
    images = toy.make_dataset(16, 0)[0]
    config = toy.TrainConfig(vae_steps=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(toy.train_vae(images, config, torch.Generator().manual_seed(1)).state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_shipped_model_is_an_official_single_file(sd):
    assert sd.family == "sd1" and sd.prediction_type == "epsilon"
    assert sd.latent_shape(32, 32) == (4, 8, 8)
    assert all(getattr(sd.unet.config, k) == v for k, v in toy.UNET.items() if k != "sample_size")
    assert sd.vae.config.block_out_channels == toy.VAE_CONFIG["block_out_channels"]
    assert sd.text_encoder.config.hidden_size == toy.TEXT["hidden_size"]
    # its model-spec metadata: sample.py's default size
    assert sd.image_size == toy.IMAGE_SIZE

    # LDM names: what official tools read; the official key set
    keys = files.read_tensors(f"{toy.ASSETS}/{toy.CHECKPOINT}").keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert {"betas", "alphas_cumprod", "posterior_mean_coef2"} <= set(keys)


def test_shipped_model_loads_and_trains_with_no_network(tmp_path):
    """A fresh process with the hub switched off and every connection sent to a closed port."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    code = (
        "import load_sd, train; sd = load_sd.load('toy'); print(sd.image_size); "
        "import sys; sys.exit(train.main(['--model', 'toy', '--concept', 'circle', "
        "'--iterations', '1', '--output', sys.argv[1], '--no-eval']))"
    )
    out = tmp_path / "circle.safetensors"
    r = subprocess.run(
        [sys.executable, "-c", code, out],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 0 and r.stdout.startswith("32"), r.stderr
    assert delta.load(out)[1]["concept"] == "circle"


def test_shipped_model_draws_what_it_is_asked_for(sd):
    """Every shape x color caption, and shape-only captions (the weaker kind), as the
    classifier judges them."""
    full = [
        (f"a {c} {s}", i, j) for i, s in enumerate(toy.SHAPES) for j, c in enumerate(toy.COLORS)
    ]
    alone = [(p.format(s), i, None) for i, s in enumerate(toy.SHAPES) for p in ("{}", "a {}")]
    for entries, seeds, at_least in ((full, [0, 1], 0.95), (alone, [0, 1, 2, 3], 0.85)):
        prompts = [e[0] for e in entries]
        images = sampler.generate(sd, prompts, seeds, **dict(toy.SAMPLING, steps=10))
        shape, color = toy.classify(images)

        shapes = torch.tensor([e[1] for e in entries] * len(seeds))
        assert (shape == shapes).float().mean() >= at_least
        if entries is full:
            colors = torch.tensor([e[2] for e in entries] * len(seeds))
            assert (color == colors).float().mean() >= 0.95


def test_classifier_held_out_accuracy():
    images, shapes, colors = toy.make_dataset(500, seed=424242)
    shape, color = toy.classify(images)
    assert (shape == shapes).float().mean() >= 0.98 and (color == colors).float().mean() >= 0.98


def test_evaluate_measures_and_restores_the_unet(sd, tmp_path):
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    same = {k: v.detach().clone() for k, v in sd.unet.named_parameters() if "attn2" in k}
    result = evaluate.evaluate(sd, same, "circle", seeds=[0], steps=3, grid=tmp_path / "grid.png")
    assert result["edited"] == result["base"]
    assert set(result["base"]) == {"circle_alone", "circle_in_context", "other_shapes", "colors"}
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (sample.MIN_CELL * 21, 16 + sample.MIN_CELL * 2)

    broken = {k: torch.randn_like(v) for k, v in same.items()}
    result = evaluate.evaluate(sd, broken, "square", seeds=[0], steps=3)
    assert result["edited"] != result["base"] and result["prompts"][:2] == ["square", "a square"]
    assert all(torch.equal(before[k], v) for k, v in sd.unet.state_dict().items())
    json.dumps(result)
    report = evaluate.format_report(result)
    assert "square_alone" in report and "edited/base" in report


def test_evaluate_cli(tmp_path, capsys):
    path = tmp_path / "d.safetensors"
    unet = load_sd.load("toy").unet
    same = {k: v.detach() for k, v in unet.named_parameters() if "attn2" in k}
    delta.save(str(path), same, {})

    flags = ["--delta", str(path), "--seeds", "1", "--steps", "2", "--output", str(tmp_path / "e")]
    assert evaluate.main(flags) == 0
    assert json.loads((tmp_path / "e.json").read_text())["edited/base"]
    assert (tmp_path / "e.png").exists()

    assert evaluate.main(["--concept", "hexagon", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the toy concept must be one of circle") and "\n" not in err
