"""ESD as LoRA (train.py --lora): the kohya names, the frozen model with the update switched off,
diffusers' load_lora_weights reading our file with every key used and drawing our image, our
merge against diffusers' fuse_lora, --resume, and the exports."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import configs
import delta
import esd
import load_sd
import lora
import sample
import sampler
import tiny
import train
import unet as unet_lib

FAST = ["--resolution", "16", "--steps", "4", "--device", "cpu", "--trajectory-pool", "0"]
PROMPT = "a red circle"

# kohya's names, written from the format's description: "lora_unet_" and the module's path in
# diffusers' UNet2DConditionModel with "." as "_" (SD v1 and 2.x; kohya's SDXL trainer writes
# LDM paths, which ComfyUI and diffusers read too). One module of each kind.
KOHYA_SD1 = {
    "conv_in": "lora_unet_conv_in",
    "time_embedding.linear_1": "lora_unet_time_embedding_linear_1",
    "time_embedding.linear_2": "lora_unet_time_embedding_linear_2",
    "down_blocks.0.resnets.0.conv1": "lora_unet_down_blocks_0_resnets_0_conv1",
    "down_blocks.0.resnets.0.time_emb_proj": "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
    "down_blocks.1.resnets.0.conv_shortcut": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
    "down_blocks.0.attentions.0.proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": (
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"
    ),
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k": (
        "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"
    ),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    ),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    ),
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    ),
    "down_blocks.0.attentions.0.proj_out": "lora_unet_down_blocks_0_attentions_0_proj_out",
    "down_blocks.0.downsamplers.0.conv": "lora_unet_down_blocks_0_downsamplers_0_conv",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    ),
    "mid_block.resnets.1.conv2": "lora_unet_mid_block_resnets_1_conv2",
    "up_blocks.0.upsamplers.0.conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0": (
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0"
    ),
    "conv_out": "lora_unet_conv_out",
}


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """A LoRA file train.py wrote for the tiny SD v1 folder: ESD-u (Linear and Conv2d modules),
    rank 2, alpha 3, a high learning rate so that the update shows in the image."""
    out = tmp_path_factory.mktemp("lora") / "esd-u.safetensors"
    args = ["--model", str(tiny_sd.folder), "--concept", "circle", "--output", str(out)]
    args += ["--method", "esd-u", "--lora", "2", "--lora-alpha", "3", "--iterations", "3"]
    assert train.main([*args, *FAST, "--lr", "0.3"]) == 0
    return out


def test_kohya_names_of_every_module_kind():
    with torch.device("meta"):
        full = unet_lib.UNet(unet_lib.UNetConfig.sd1())
    paths = lora.modules_of(full, lambda name: True)
    assert {path: lora.kohya_name(path) for path in KOHYA_SD1} == KOHYA_SD1
    assert set(KOHYA_SD1) <= set(paths)

    # Each kind of module (its last name that is not a number) has a row above.
    def kind(path):
        return [part for part in path.split(".") if not part.isdigit()][-1]

    assert {kind(p) for p in paths} == {kind(p) for p in KOHYA_SD1}


def test_lora_counts_on_full_sd1_unet():
    """docs/models.md's counts: ESD-x as LoRA updates the 64 attn2 Linears (16 transformer blocks x
    q, k, v, out); ESD-u the Linear and Conv2d modules of its 598 tensors (the norms have no
    low-rank form): 215 of them."""
    with torch.device("meta"):
        full = unet_lib.UNet(unet_lib.UNetConfig.sd1())
    counts = {}
    for method in ("esd-x", "esd-u"):
        selected = esd.select(full, method)
        modules = lora.modules_of(full, lambda name: name in selected)
        convs = sum(isinstance(m, nn.Conv2d) for m in modules.values())
        counts[method] = (len(modules), convs)
    assert counts == {"esd-x": (16 * 4, 0), "esd-u": (215, 97)}


def test_frozen_is_the_same_unet_with_the_update_off():
    model = tiny.randomize(
        unet_lib.UNet(configs.config_from_json(unet_lib.UNetConfig, tiny.UNET_V1))
    )
    reference = copy.deepcopy(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = esd.ESD(model, "esd-u", rank=2, steps=4)
    assert trainer.originals == {} and all(not p.requires_grad for p in model.parameters())

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, 64, generator=g)
    uncond = torch.randn(1, 77, 64, generator=g)
    x_t = torch.randn(1, 4, 8, 8, generator=g)
    optimizer = torch.optim.Adam(trainer.params.values(), lr=1e-2)
    for _ in range(2):
        loss = trainer.loss(x_t, 2, cond, uncond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The UNet's own weights never moved; the update did, and it changes the prediction
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    t = int(sampler.ddim_timesteps(4)[2])
    with torch.no_grad():
        want = reference(x_t, t, cond)
        assert torch.equal(trainer.eps(x_t, t, cond, frozen=True), want)
        assert not torch.allclose(trainer.eps(x_t, t, cond), want)

    # Merged into the weights, the update gives the trained prediction
    merged = copy.deepcopy(reference)
    delta.apply(merged, lora.merged(merged, trainer.delta()))
    with torch.no_grad():
        torch.testing.assert_close(merged(x_t, t, cond), trainer.eps(x_t, t, cond))


def test_file_layout_and_metadata(trained):
    tensors = load_file(trained)
    meta = delta.load(trained)[1]
    names = {k.rsplit(".", 2)[0] if "lora_" in k else k.removesuffix(".alpha") for k in tensors}
    assert all(n.startswith("lora_unet_") for n in names)
    for n in names:
        down = tensors[n + ".lora_down.weight"]
        up = tensors[n + ".lora_up.weight"]
        assert down.shape[0] == 2 and up.shape[1] == 2 and tensors[n + ".alpha"].item() == 3
    assert len(tensors) == 3 * len(names)
    assert any(tensors[k].dim() == 4 for k in tensors), "convolutions are in it (LoCon)"
    kohya = (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"])
    assert kohya == ("networks.lora", "2", "3.0")
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == "esd-u" and meta["method"] == "esd-u"


def fresh_pipeline(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd.folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_loads_every_key_and_draws_our_image(trained, tiny_sd, tmp_path, capsys):
    tensors = load_file(trained)
    pipe = fresh_pipeline(tiny_sd)
    pipe.load_lora_weights(str(trained))

    # Every module of the file has its A and B in diffusers' UNet, as written: no key unused
    loaded = {}
    for path, m in pipe.unet.named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A):
            (adapter,) = m.lora_A.keys()
            loaded[lora.kohya_name(path)] = (m.lora_A[adapter].weight, m.lora_B[adapter].weight)
    assert len(tensors) == 3 * len(loaded)
    for name, (a, b) in loaded.items():
        assert torch.equal(a, tensors[name + lora.DOWN])
        assert torch.equal(b, tensors[name + lora.UP])

    # The same image from their pipeline and from sample.py --delta, at 0.6 strength too
    images = {}
    for scale in (1.0, 0.6):
        out = tmp_path / f"ours-{scale}.png"
        args = ["--model", tiny_sd.folder, "--prompt", PROMPT, "--seed", 3, "--steps", 4]
        args += ["--height", 16, "--width", 16, "--output", out, "--device", "cpu"]
        args += ["--delta", trained, "--delta-scale", scale]
        assert sample.main(list(map(str, args))) == 0, capsys.readouterr().err
        ours = np.asarray(Image.open(out)).astype(int)
        images[scale] = ours
        with torch.no_grad():
            theirs = pipe(
                PROMPT,
                num_inference_steps=4,
                height=16,
                width=16,
                generator=torch.Generator().manual_seed(3),
                output_type="np",
                cross_attention_kwargs={"scale": scale},
            ).images[0]
        theirs = (theirs * 255).round().astype(int)
        assert np.abs(ours - theirs).max() <= 1, scale

    # ... and the update shows in the image: the base model's differs, past the tolerance
    pipe.unload_lora_weights()
    with torch.no_grad():
        base = pipe(
            PROMPT,
            num_inference_steps=4,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images[0]
    assert np.abs((base * 255).round().astype(int) - images[1.0]).max() > 4


def test_our_merge_equals_diffusers_fuse_lora(trained, tiny_sd):
    pipe = fresh_pipeline(tiny_sd)
    pipe.load_lora_weights(str(trained))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()

    ours = load_sd.load(tiny_sd.folder).unet
    with delta.applied(ours, trained, scale=0.7):
        merged = ours.state_dict()
        for k, v in merged.items():
            torch.testing.assert_close(v, fused[k], atol=1e-6, rtol=1e-5, msg=k)
    changed = [k for k in merged if not torch.equal(merged[k], ours.state_dict()[k])]
    assert changed == [], "applied() put the originals back"


def test_resume_with_lora_gives_the_uninterrupted_runs_file(tiny_sd, tmp_path):
    common = ["--model", str(tiny_sd.folder), "--concept", "circle", "--lora", "2", *FAST]
    whole = tmp_path / "whole.safetensors"
    parts = tmp_path / "parts.safetensors"
    assert train.main([*common, "--output", str(whole), "--iterations", "4"]) == 0
    assert train.main([*common, "--output", str(parts), "--iterations", "2"]) == 0
    assert train.main([*common, "--output", str(parts), "--iterations", "4", "--resume"]) == 0
    a = load_file(whole)
    b = load_file(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert delta.load(parts)[1]["ss_steps"] == "4"

    # A full run's checkpoint does not resume as a LoRA one
    full = tmp_path / "full.safetensors"
    no_lora = [a for a in common if a not in ("--lora", "2")]
    assert train.main([*no_lora, "--output", str(full), "--iterations", "2"]) == 0
    assert train.main([*common, "--output", str(full), "--iterations", "4", "--resume"]) == 2


def test_export_full_merges_the_lora_and_keeps_the_files_dtype(tiny_sd, trained, tmp_path):
    # The tiny model as an fp16 single file, made with safetensors alone
    half = tmp_path / "half.safetensors"
    tensors = load_file(tiny_sd.single)
    save_file({k: t.half() if t.is_floating_point() else t for k, t in tensors.items()}, half)

    out = tmp_path / "lora.safetensors"
    exported = tmp_path / "full.safetensors"
    args = ["--model", str(half), "--tokenizer", str(tiny_sd.tokenizer), "--concept", "circle"]
    args += ["--lora", "2", "--iterations", "2", "--output", str(out), *FAST, "--lr", "0.05"]
    assert train.main([*args, "--export-full", str(exported)]) == 0

    written = load_file(exported)
    floats = {t.dtype for t in written.values() if t.is_floating_point()}
    assert floats == {torch.float16}
    meta = delta.load(exported)[1]
    spec = ("sai_model_spec", "architecture", "implementation", "title")
    assert all(meta.get(f"modelspec.{field}") for field in spec)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "full"

    # The export is the base with the LoRA merged (in fp16)
    base = load_sd.load(str(half), tokenizer=str(tiny_sd.tokenizer))
    with delta.applied(base.unet, str(out)):
        want = {k: v.half() for k, v in base.unet.state_dict().items()}
    got = load_sd.load(str(exported), tokenizer=str(tiny_sd.tokenizer)).unet.state_dict()
    assert all(torch.equal(got[k].half(), want[k]) for k in want)
    assert any(not torch.equal(got[k], base.unet.state_dict()[k]) for k in want)

    # --export-dtype chooses
    again = tmp_path / "full32.safetensors"
    args = [*args, "--overwrite", "--export-full", str(again), "--export-dtype", "float32"]
    assert train.main(args) == 0
    assert {t.dtype for t in load_file(again).values() if t.is_floating_point()} == {torch.float32}


def test_a_lora_of_another_unet_is_refused():
    xl = UNet2DConditionModel(**tiny.UNET_XL)
    ours = unet_lib.UNet(configs.config_from_json(unet_lib.UNetConfig, tiny.UNET_V1))
    other = lora.attach(xl, lambda name: "attn2" in name, 2).state()
    for tensors in (other, {"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 2)}):
        with pytest.raises(ValueError, match="not a LoRA file|do not fit"):
            lora.merged(ours, tensors)
