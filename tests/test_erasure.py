"""docs/results.md's erasure numbers, end to end: `python train.py --model toy --concept circle`
(ESD-x, toy defaults) and its ESD-u variant on the shipped toy model, judged by the shipped
classifier over every prompt x 8 seeds. Fixed seeds; thresholds a little looser than the measured
values (docs/results.md). Slow: a few CPU minutes per method."""

import pytest

import evaluate
import load_sd
import train

pytestmark = pytest.mark.slow

# method -> (extra train.py flags, {score: (bound on edited / base, "max" or "min")}), with the
# default x_t (an on-policy trajectory pool, 4 per batch row re-sampled every 40 iterations).
# Measured edited / base (seed 0) in the comments; docs/results.md has them all.
CASES = {
    "esd-x": (
        [],
        {
            "circle_alone": (0.10, "max"),  # measured 0
            "circle_in_context": (0.55, "max"),  # 0.42
            "other_shapes": (0.95, "min"),  # 1.0
            "colors": (0.95, "min"),  # 1
        },
    ),
    "esd-u": (
        ["--method", "esd-u", "--lr", "2e-4", "--negative-guidance", "2", "--batch-size", "8"]
        + ["--iterations", "300"],
        {
            "circle_alone": (0.50, "max"),  # measured 0.29
            "circle_in_context": (0.45, "max"),  # 0.23
            "other_shapes": (0.85, "min"),  # 0.88
            "colors": (0.95, "min"),  # 1
        },
    ),
}


@pytest.mark.parametrize("method", CASES)
def test_toy_erasure(method, tmp_path):
    flags, bounds = CASES[method]
    delta = tmp_path / "delta.safetensors"
    argv = ["--model", "toy", "--concept", "circle", "--output", str(delta), "--no-eval", *flags]
    assert train.main(argv) == 0
    result = evaluate.evaluate(load_sd.load("toy"), str(delta), "circle")

    # circles to erase
    assert result["base"]["circle_alone"] >= 0.8 and result["base"]["circle_in_context"] >= 0.9

    for score, (bound, kind) in bounds.items():
        ratio = result["edited/base"][score]
        message = f"{score}: {result['base']} -> {result['edited']}"
        assert ratio <= bound if kind == "max" else ratio >= bound, message
