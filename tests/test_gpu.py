"""The CUDA path (skipped without a GPU): the same seed gives the CPU's image, and ESD under bf16
autocast keeps its trained weights and Adam state in fp32 and changes only the selected tensors."""

import pytest
import torch

import delta
import load_sd
import sample
import sampler
import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def model(tiny_sd):
    return str(tiny_sd.folder)


def test_cuda_image_equals_cpu_image(model):
    images = {}
    for device in ("cpu", "cuda"):
        sd = load_sd.load(model, device=device)
        decoded = sampler.generate(sd, ["a car"], [7, 8], steps=5, height=16, width=16)
        images[device] = sample.to_pil(decoded)

    # TF32 and kernel order differ, not the math
    for cpu, cuda in zip(images["cpu"], images["cuda"]):
        diff = (torch.tensor(list(cpu.getdata())) - torch.tensor(list(cuda.getdata()))).abs().max()
        assert diff <= 2, f"max pixel difference {diff}/255"


def test_bf16_autocast_training_keeps_fp32_weights(model, tmp_path):
    sd = load_sd.load(model, device="cuda")
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    config = train.TrainConfig(
        model=model,
        concept="car",
        iterations=3,
        lr=1e-3,
        resolution=16,
        steps=4,
        device="cuda",
        dtype="bfloat16",
        output=str(tmp_path / "d.safetensors"),
    )
    trainer = train.train(config, sd, ["car"])
    assert all(p.dtype == torch.float32 for p in trainer.params.values())
    adam = torch.load(config.output + ".resume.pt", weights_only=True)["optimizer"]["state"]
    assert adam
    assert all(s["exp_avg"].dtype == torch.float32 for s in adam.values())
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in adam.values())
    after = sd.unet.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if "attn2" in k}
    tensors, _ = delta.load(config.output)
    assert all(t.dtype == torch.float32 for t in tensors.values())
