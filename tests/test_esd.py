"""ESD (esd.py): targets on hand-made tensors, filters at full size, what training may and may
not change, the frozen model staying the original one, delta files (delta.py: ours and diffusers'
UNet load them, the official formats), and where x_t comes from: esd.draw's stream, the paper's
x_t sampled afresh, and trajectory pools giving the same x_t as direct sampling."""

import copy
import os
import random

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

import configs
import convert
import delta
import esd
import files
import sampler
import tiny
import unet as unet_lib

# DDIM steps of the x_t trajectories: enough to exercise partial sampling, fast on CPU
STEPS = 6
# tests/fixtures/README.md, "ESD filter sizes on the full SD v1 UNet": (tensors, parameters)
FULL_SD1_COUNTS = {
    "esd-x": (80, 43_962_560),
    "esd-x-strict": (32, 19_169_280),
    "esd-u": (598, 813_495_680),
    "selfattn": (80, 49_574_080),
    "esd-all": (686, 859_520_964),
}
# The same on the full SDXL base UNet (docs/models.md's memory figures); esd_sdxl.py's "esd-u"
# (all but attn2) takes 12 tensors more: time_embedding, add_embedding, conv_norm_out, conv_out.
FULL_SDXL_COUNTS = {
    "esd-x": (350, 545_670_400),
    "esd-u": (1318, 2_014_485_120),
    "esd-all": (1680, 2_567_463_684),
}


def tiny_unet(config=tiny.UNET_V1, seed=0):
    return tiny.randomize(
        unet_lib.UNet(configs.config_from_json(unet_lib.UNetConfig, config)), seed=seed
    )


def contexts(n=3, batch=1, seed=0):
    """n random text contexts [batch, 77, 64] (stand-ins for "", the concept, an anchor)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 77, tiny.UNET_V1["cross_attention_dim"], generator=g) for _ in range(n)
    ]


def noise(seed, batch=1):
    return torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_targets_on_hand_made_tensors():
    e_0, e_c, e_a = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor([10.0, 10.0])
    torch.testing.assert_close(esd.TARGETS["esd"](e_0, e_c, 1.0), torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(esd.TARGETS["esd"](e_0, e_c, 0.5), torch.tensor([0.0, 2.5]))
    # esd_sd.py's spelling e_c - eta'(e_c - e_0) with eta' = eta + 1 is the same line
    for eta in (0.5, 1.0, 3.0):
        torch.testing.assert_close(esd.TARGETS["esd"](e_0, e_c, eta), e_c - (eta + 1) * (e_c - e_0))
    # an anchor a replaces the base e_0 (not the guidance direction): e_a - eta (e_c - e_0)
    torch.testing.assert_close(esd.TARGETS["esd"](e_0, e_c, 1.0, e_a), torch.tensor([8.0, 11.0]))
    torch.testing.assert_close(esd.TARGETS["esd"](e_0, e_c, 2.0, e_a), torch.tensor([6.0, 12.0]))


@pytest.mark.parametrize("method", sorted(FULL_SD1_COUNTS))
def test_filter_counts_on_full_sd1_unet(method):
    with torch.device("meta"):
        full = unet_lib.UNet(unet_lib.UNetConfig.sd1())
    selected = esd.select(full, method)
    assert (len(selected), sum(p.numel() for p in selected.values())) == FULL_SD1_COUNTS[method]


def test_filter_counts_on_full_sdxl_unet():
    with torch.device("meta"):
        full = unet_lib.UNet(unet_lib.UNetConfig.sdxl())
    counts = {}
    for method in FULL_SDXL_COUNTS:
        selected = esd.select(full, method)
        counts[method] = (len(selected), sum(p.numel() for p in selected.values()))
    assert counts == FULL_SDXL_COUNTS
    # esd_sdxl.py's esd-u
    official_u = [p.numel() for name, p in full.named_parameters() if "attn2" not in name]
    assert (len(official_u), sum(official_u)) == (1330, 2_021_793_284)


def test_esd_u_and_esd_x_split_the_unet():
    names = [n for n, _ in tiny_unet().named_parameters()]
    u = set(esd.select(tiny_unet(), "esd-u"))
    x = set(esd.select(tiny_unet(), "esd-x"))
    assert not u & x and all("attn2" in n for n in x)
    assert sorted(set(names) - u - x) == sorted(
        n for n in names if n.split(".")[0] in ("time_embedding", "conv_norm_out", "conv_out")
    )
    assert any("norm" in n for n in u)  # train-esd.py's ESD-u trains the norms too


def test_unknown_filter_lists_the_valid_ones():
    with pytest.raises(ValueError, match="xattn") as e:
        # the official README's name, which esd_sd.py silently ignored
        esd.select(tiny_unet(), "xattn")
    assert all(name in str(e.value) for name in esd.FILTERS) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="esd-x"):
        esd.ESD(tiny_unet(), "noxattn")
    with pytest.raises(ValueError, match="esd"):
        esd.ESD(tiny_unet(), target="nope")


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_training_changes_only_the_selected_tensors_and_keeps_the_frozen_model(method):
    model = tiny_unet()
    reference = copy.deepcopy(model)  # never touched: the frozen model must keep matching it
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = esd.ESD(model, method, steps=STEPS)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainer.params)
    opt = torch.optim.Adam(trainer.params.values(), lr=1e-3)
    uncond, cond, _ = contexts()
    for it in range(3):
        t_enc = [3, 0, STEPS - 1][it]
        x_t = trainer.sample(noise(it), cond, uncond, t_enc, xt_from="trained")
        t = int(sampler.ddim_timesteps(STEPS)[t_enc])
        # frozen predictions == the untouched model's, though the weights moved
        with torch.no_grad():
            assert torch.equal(trainer.eps(x_t, t, cond, frozen=True), reference(x_t, t, cond))
            expected = F.mse_loss(
                model(x_t, t, cond),
                esd.esd_target(reference(x_t, t, uncond), reference(x_t, t, cond), 1.0),
            )
        # t is where x_t sits
        loss = trainer.loss(x_t, t_enc, cond, uncond)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if name in trainer.params:
            assert not torch.equal(p, initial[name]), name
            assert torch.equal(trainer.originals[name], initial[name]), name
        else:
            assert torch.equal(p, initial[name]), name
    assert set(trainer.originals) == set(trainer.params)
    # x_t sampled with the frozen model is the untouched model's x_t; with the trained one it moved
    x_frozen = trainer.sample(noise(9), cond, uncond, 5, xt_from="frozen")
    ref_x = sampler.sample(
        reference, noise(9), cond, uncond, steps=STEPS, guidance=esd.GUIDANCE, until=5
    )
    assert torch.equal(x_frozen, ref_x)
    assert not torch.allclose(trainer.sample(noise(9), cond, uncond, 5, xt_from="trained"), ref_x)


def test_loss_decreases_on_a_fixed_x_t():
    trainer = esd.ESD(tiny_unet(), "esd-x", steps=STEPS)
    uncond, cond, _ = contexts()
    x_t = trainer.sample(noise(0), cond, uncond, 2)
    opt = torch.optim.Adam(trainer.params.values(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = trainer.loss(x_t, 2, cond, uncond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_anchor_target_asks_the_trained_model_on_the_anchor_prompt():
    model = tiny_unet()
    reference = copy.deepcopy(model)
    trainer = esd.ESD(model, "esd-x", negative_guidance=2.0, steps=STEPS)
    uncond, cond, anchor = contexts()
    x_t = trainer.sample(noise(0), anchor, uncond, 2)
    t = int(sampler.ddim_timesteps(STEPS)[2])
    with torch.no_grad():
        e_0 = reference(x_t, t, uncond)
        e_c = reference(x_t, t, cond)
        target = reference(x_t, t, anchor) - 2.0 * (e_c - e_0)
        expected = F.mse_loss(model(x_t, t, anchor), target)
    loss = trainer.loss(x_t, 2, cond, uncond, anchor)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_sdxl_conditioning_travels_through_sampling_and_the_loss():
    """SDXL's conditioning, (context, added) tuples, joins and expands elementwise (sampler.cat)
    through x_t sampling and the loss (uncond and anchor of batch 1, cond and t_enc one per row):
    the same numbers as the UNet called on each row's own context and added vector."""
    model = tiny_unet(tiny.UNET_XL)
    reference = copy.deepcopy(model)
    trainer = esd.ESD(model, "esd-x", negative_guidance=2.0, steps=STEPS)

    # Four conditionings: (context, pooled text + the size and crop conditioning)
    g = torch.Generator().manual_seed(0)
    size_and_crop = torch.tensor([[16.0, 16, 0, 0, 16, 16]])
    conditionings = []
    for _ in range(4):
        context = torch.randn(1, 77, tiny.UNET_XL["cross_attention_dim"], generator=g)
        pooled = torch.randn(1, tiny.XL_POOLED, generator=g)
        conditionings.append((context, torch.cat([pooled, size_and_crop], -1)))
    uncond, cond_a, cond_b, anchor = conditionings

    # x_t sampled one row at a time == both rows in one batch
    x_t = torch.cat([trainer.sample(noise(i), anchor, uncond, 2) for i in (0, 1)])
    x_T = torch.cat([noise(0), noise(1)])
    both = trainer.sample(x_T, sampler.cat([anchor] * 2), sampler.cat([uncond] * 2), 2)
    torch.testing.assert_close(both, x_t, rtol=1e-5, atol=1e-5)

    # The loss with a concept and a t_enc per row == each row's own, averaged
    t_enc = torch.tensor([2, 4])
    cond = sampler.cat([cond_a, cond_b])
    timesteps = sampler.ddim_timesteps(STEPS)[t_enc].tolist()
    expected = []
    with torch.no_grad():
        for row, (t, c) in enumerate(zip(timesteps, (cond_a, cond_b))):
            x = x_t[row : row + 1]
            e_0 = reference(x, t, *uncond)
            e_c = reference(x, t, *c)
            target = reference(x, t, *anchor) - 2.0 * (e_c - e_0)
            expected.append((model(x, t, *anchor) - target).square().mean())
    loss = trainer.loss(x_t, t_enc, cond, uncond, anchor)
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-7)


def test_bf16_autocast_keeps_trained_tensors_and_adam_state_fp32():
    trainer = esd.ESD(tiny_unet(), "esd-x", steps=STEPS, dtype=torch.bfloat16)
    opt = torch.optim.Adam(trainer.params.values(), lr=1e-3)
    uncond, cond, _ = contexts()
    loss = trainer.loss(trainer.sample(noise(0), cond, uncond, 3), 3, cond, uncond)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in trainer.params.values())
    assert all(p.grad.dtype == torch.float32 for p in trainer.params.values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def trained_esd(method="esd-x"):
    """An ESD trainer after 2 steps on a tiny UNet, and a copy of the UNet's initial weights."""
    model = tiny_unet()
    base = copy.deepcopy(model)
    trainer = esd.ESD(model, method, steps=STEPS)
    opt = torch.optim.Adam(trainer.params.values(), lr=1e-2)
    uncond, cond, _ = contexts()
    for it in range(2):
        x_t = trainer.sample(noise(it), cond, uncond, 4)
        trainer.loss(x_t, 4, cond, uncond).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return trainer, base


def test_delta_round_trip_into_ours_and_diffusers(tmp_path):
    trainer, base = trained_esd()
    trained = trainer.unet
    tensors = trainer.delta()
    meta = dict(
        concept="car",
        method="esd-x",
        negative_guidance=1.0,
        iterations=2,
        lr=1e-2,
        seed=0,
        base_model="tiny",
    )
    path = str(tmp_path / "esd-car.safetensors")
    delta.save(path, tensors, meta)
    # the temporary file was renamed away; the file mode is not safetensors' 0600
    assert os.listdir(tmp_path) == ["esd-car.safetensors"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~files.UMASK
    loaded, metadata = delta.load(path)
    assert metadata == {"format": delta.FORMAT, **{k: str(v) for k, v in meta.items()}}
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert set(loaded) == {n for n in dict(base.named_parameters()) if "attn2" in n}

    x = noise(5, batch=2)
    t = 401
    (context,) = contexts(1, batch=2)
    with torch.no_grad():
        expected = trained(x, t, context)
        ours = delta.apply(copy.deepcopy(base), loaded)
        torch.testing.assert_close(ours(x, t, context), expected, rtol=0, atol=0)
        theirs = UNet2DConditionModel(**tiny.UNET_V1).eval()
        theirs.load_state_dict(base.state_dict(), strict=True)
        before = theirs(x, t, encoder_hidden_states=context).sample
        result = theirs.load_state_dict(loaded, strict=False)
        assert result.unexpected_keys == []
        assert len(result.missing_keys) == len(base.state_dict()) - len(loaded)
        after = theirs(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    # the delta is what makes them agree
    assert not torch.allclose(before, after, atol=1e-4)


def test_applied_restores_the_originals_also_on_error(tmp_path):
    trainer, base = trained_esd()
    model = copy.deepcopy(base)
    tensors = trainer.delta()
    x = noise(5)
    t = 401
    (context,) = contexts(1)
    with torch.no_grad():
        with delta.applied(model, tensors) as edited:
            want = trainer.unet(x, t, context)
            torch.testing.assert_close(edited(x, t, context), want, rtol=0, atol=0)
        assert all(torch.equal(p, base.state_dict()[n]) for n, p in model.named_parameters())
        name, tensor = next(iter(tensors.items()))
        bad = {name: torch.full_like(tensor, float("nan"))}
        # a later delta that does not fit: the first is undone
        with pytest.raises(delta.LoadError, match="NaN"):
            with delta.applied(model, tensors, bad):
                pass
        with pytest.raises(KeyError):
            with delta.applied(model, tensors):
                raise KeyError("an error inside the block")
    assert all(torch.equal(p, base.state_dict()[n]) for n, p in model.named_parameters())


def test_official_2023_compvis_pt_is_read_as_its_unet(tmp_path):
    """train-esd.py saved the whole edited model, LDM names, with torch.save: its UNet part is the
    delta."""
    trainer, base = trained_esd("esd-u")
    ldm = {
        convert.ours_to_ldm(f"unet.{k}", base.config): v
        for k, v in trainer.unet.state_dict().items()
    }
    ldm.update(
        {
            "first_stage_model.decoder.conv_in.weight": torch.zeros(3),
            "betas": torch.zeros(1000),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(3),
        }
    )
    torch.save({"state_dict": ldm}, tmp_path / "compvis-word_car-method_noxattn.pt")
    loaded, metadata = delta.load(tmp_path / "compvis-word_car-method_noxattn.pt", base.config)
    assert metadata == {} and loaded.keys() == trainer.unet.state_dict().keys()
    edited = delta.apply(copy.deepcopy(base), loaded)
    assert all(torch.equal(p, trainer.unet.state_dict()[n]) for n, p in edited.named_parameters())


def test_delta_with_wrong_keys_or_shapes_is_rejected():
    model = tiny_unet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # a 128-wide context: other to_k/to_v shapes
    other = esd.ESD(tiny_unet(tiny.UNET_V2), "esd-x").delta()
    wrong_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_k.weight"
    wrong_key = {wrong_name: torch.zeros(64, 64)}
    for bad in (other, wrong_key, {}):
        with pytest.raises(delta.LoadError, match="does not fit") as e:
            delta.apply(model, bad)
        assert "\n" not in str(e.value)
    # nothing half-applied
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_trajectory_pool_gives_the_directly_sampled_x_t():
    # trained != frozen weights, so which one samples matters
    trainer, base = trained_esd()
    uncond, cond, _ = contexts(batch=2)
    x_T = noise(3, batch=2)

    # frozen: == the untouched model sampled directly, same seed and t_enc
    frozen = trainer.sample(x_T, cond, uncond, STEPS - 1, xt_from="frozen", trajectory=True)
    assert frozen.shape == (STEPS, 2, 4, 8, 8) and torch.equal(frozen[0], x_T)
    for t_enc in (1, STEPS - 1):
        direct = sampler.sample(
            base, x_T, cond, uncond, steps=STEPS, guidance=esd.GUIDANCE, until=t_enc
        )
        assert torch.equal(frozen[t_enc], direct), t_enc

    # on-policy: == the trained model's x_t sampled directly
    on_policy = trainer.sample(x_T, cond, uncond, STEPS - 1, xt_from="trained", trajectory=True)
    for t_enc in (2, STEPS - 1):
        direct = trainer.sample(x_T, cond, uncond, t_enc, xt_from="trained")
        assert torch.equal(on_policy[t_enc], direct), t_enc
    assert not torch.allclose(frozen[-1], on_policy[-1])


def test_draw_is_a_fixed_stream_of_seed_stream_and_index():
    """esd.draw's numbers depend on (seed, stream, i) alone, and are drawn in a fixed order: the
    noise seed first, then the concept index, then t_enc (train.py's runs depend on it)."""
    assert esd.draw(1, "iteration", 7, 2, STEPS) == esd.draw(1, "iteration", 7, 2, STEPS)
    assert esd.draw(1, "iteration", 7, 2, STEPS) != esd.draw(1, "iteration", 8, 2, STEPS)
    assert esd.draw(1, "iteration", 7, 2, STEPS) != esd.draw(1, "pool0", 7, 2, STEPS)
    rng = random.Random("1/iteration/7")
    noise_seed = rng.getrandbits(62)
    concept_index = rng.randrange(2)
    t_enc = rng.randrange(STEPS)
    assert esd.draw(1, "iteration", 7, 2, STEPS) == (concept_index, t_enc, noise_seed)


def test_paper_x_t_is_sampled_afresh_from_seed_and_iteration_alone():
    trainer, _ = trained_esd()
    uncond, *conds = contexts(3)
    source = esd.PaperXt(trainer, conds, uncond, (4, 8, 8), seed=1, batch_size=2)
    concept_indices, t_enc, x_t = source.draw(7)

    # A resumed run: a new source draws the same
    again = esd.PaperXt(trainer, conds, uncond, (4, 8, 8), seed=1, batch_size=2).draw(7)
    assert (concept_indices, t_enc) == again[:2] and torch.equal(x_t, again[2])
    assert source.state() == {}

    # B x_t of one concept at one t_enc, from the iteration's noise seed, sampled by the trainer
    assert len(set(concept_indices)) == 1 and x_t.shape == (2, 4, 8, 8)
    assert not torch.equal(x_t[0], x_t[1])
    concept_index, _, noise_seed = esd.draw(1, "iteration", 7, len(conds), STEPS)
    assert concept_indices[0] == concept_index
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(noise_seed))
    cond = conds[concept_index].expand(2, -1, -1)
    assert torch.equal(x_t, trainer.sample(x_T, cond, uncond.expand(2, -1, -1), t_enc))

    # every concept and every t_enc is drawn
    draws = [source.draw(it)[:2] for it in range(40)]
    assert {c[0] for c, _ in draws} == {0, 1}
    assert {t for _, t in draws} == set(range(STEPS))


def test_trajectory_pool_reads_its_generation_and_resumes_it():
    trainer, _ = trained_esd()
    uncond, *conds = contexts(3)
    shape = (4, 8, 8)

    def new_pool():
        return esd.TrajectoryPool(
            trainer, conds, uncond, shape, seed=1, batch_size=2, size=3, refresh=4
        )

    # One generation of 3 trajectories: 2 consecutive entries an iteration, at its t_enc
    pool = new_pool()
    paper = esd.PaperXt(trainer, conds, uncond, shape, seed=1, batch_size=2)
    served = []
    for it in range(4):
        concept_indices, t_enc, x_t = pool.draw(it)
        # the same t_enc as without a pool
        assert t_enc == paper.numbers("iteration", it)[1] and pool.built == 0
        for j, i in enumerate((2 * it + k) % 3 for k in range(2)):
            assert concept_indices[j] == pool.concept_indices[i]
            assert torch.equal(x_t[j], pool.paths[t_enc, i])
        served.append(t_enc)
    message = "the pool ends at the last t_enc its generation serves"
    assert len(pool.paths) == max(served) + 1, message

    # Each entry is its own trajectory: the same as sampled alone (and uncut)
    for i in range(3):
        concept_index, _, noise_seed = esd.draw(1, "pool0", i, len(conds), STEPS)
        alone = pool.sample([concept_index], [noise_seed], 1, STEPS - 1, trajectory=True)
        torch.testing.assert_close(
            pool.paths[:, i], alone[: len(pool.paths), 0], rtol=1e-5, atol=1e-5
        )

    # Iteration 4 starts generation 1: new trajectories
    before = pool.paths
    pool.draw(4)
    assert pool.built == 1
    assert pool.concept_indices == [esd.draw(1, "pool1", i, len(conds), STEPS)[0] for i in range(3)]
    message = "new noise, new trajectories"
    assert not any(torch.equal(before[1, i], pool.paths[1, i]) for i in range(3)), message

    # A resumed run rebuilds the same generation
    assert torch.equal(new_pool().draw(5)[2], pool.draw(5)[2])

    # --resume: the pool as it was, not one rebuilt from the checkpoint's weights
    restored = new_pool()
    restored.restore(pool.state())
    assert restored.built == 1 and torch.equal(restored.draw(6)[2], pool.draw(6)[2])


def test_x_t_sources_are_chosen_by_name():
    assert esd.XT_SOURCES == {"paper": esd.PaperXt, "pool": esd.TrajectoryPool}
