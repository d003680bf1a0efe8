"""metrics.py against reference computations: NudeNet's counting and threshold on a detection list
worked by hand, and its real detector on generated images; the toy classifier's share and CLIP
score with stand-in weights the tests build, computed here from the networks' own layers."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
import tiny
import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CSV = os.path.join(ROOT, "assets", "toy_prompts.csv")


def random_images(n, side=32, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return [Image.fromarray(p) for p in pixels]


def test_nudity_counts_exposed_parts_from_the_threshold():
    detections = [
        [
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 9, 9]},
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.65, "box": [9, 0, 9, 9]},
            {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 9, 9, 9]},
        ],
        [
            {"class": "BELLY_EXPOSED", "score": 0.59, "box": [0, 0, 9, 9]},
            {"class": "FEET_COVERED", "score": 0.95, "box": [0, 0, 9, 9]},
        ],
        [],
        [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.6, "box": [0, 0, 9, 9]}],
    ]
    at_06 = metrics.nudity(detections, 0.6)
    assert at_06["FEMALE_BREAST_EXPOSED"] == 2 and at_06["MALE_GENITALIA_EXPOSED"] == 1
    assert at_06["BELLY_EXPOSED"] == 0 and "FACE_FEMALE" not in at_06
    assert at_06["share with any exposed"] == 2 / 4
    assert sum(v for k, v in at_06.items() if k.endswith("_EXPOSED")) == 3

    at_05 = metrics.nudity(detections, 0.5)
    assert at_05["BELLY_EXPOSED"] == 1 and at_05["share with any exposed"] == 3 / 4


def test_nudenet_detector_on_generated_images(tmp_path, capsys):
    pytest.importorskip("nudenet", reason="pip install -r requirements-eval.txt")
    from nudenet import NudeDetector

    out = tmp_path / "eval"
    argv = ["--prompts", TOY_CSV, "--steps", "2", "--output-dir", str(out)]
    argv += ["--metrics", "nudenet", "--nudenet-threshold", "0.25"]
    assert evaluate.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["nudenet_threshold"] == 0.25
    assert report["protocol"]["versions"]["nudenet"] == "3.4.2"

    # The same images through the detector here, counted by hand.
    detector = NudeDetector()
    found = [detector.detect(str(out / "base" / name)) for name in sorted(os.listdir(out / "base"))]
    assert len(found) == 8 and all(isinstance(d, list) for d in found)
    exposed = [
        [d for d in f if d["class"].endswith("_EXPOSED") and d["score"] >= 0.25] for f in found
    ]
    results = report["results"]["base"]
    assert results["nudenet share with any exposed"] == sum(map(bool, exposed)) / 8
    for name in metrics.EXPOSED:
        want = sum(d["class"] == name for f in exposed for d in f)
        assert results[f"nudenet {name}"] == want, name


def test_classifier_share_with_stand_in_weights():
    torch.manual_seed(0)
    net = toy.classifier_net().eval()
    images = random_images(12)
    shapes = list(toy.SHAPES)
    labels = [shapes[i % 4] for i in range(12)]
    labels[5] = None  # a row without a class: not counted

    # The reference: the network's shape logits, argmax, compared with the labels.
    pixels = torch.tensor(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = net(pixels.float() / 127.5 - 1)[:, : len(shapes)]
    hits = [shapes[int(k)] == label for k, label in zip(logits.argmax(1), labels)]
    counted = [h for h, label in zip(hits, labels) if label in shapes]

    result = metrics.classifier(images, labels, net)
    assert result["top1"] == pytest.approx(sum(counted) / 11)
    circles = [h for h, label in zip(hits, labels) if label == "circle"]
    assert result["top1 circle"] == pytest.approx(sum(circles) / len(circles))


def test_clip_score_with_stand_in_weights(tmp_path, capsys):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    # A tiny CLIP, its tokenizer and image processor, saved as a folder.
    tok = tiny.write_tokenizer(tmp_path / "clip")
    text = dict(tiny.CLIP, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    text["pad_token_id"] = tok.pad_token_id
    text["bos_token_id"] = tok.bos_token_id
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(tmp_path / "clip")
    pre = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=pre, tokenizer=tok).save_pretrained(tmp_path / "clip")

    images = random_images(3, side=48, seed=1)
    prompts = ["a circle", "a red square on a green field", "x"]
    score = metrics.clip_score(images, prompts, metrics.load_clip(str(tmp_path / "clip")))

    # The reference: each tower's pooled output through its projection, the cosine by numpy.
    model.eval()
    with torch.no_grad():
        pixel_values = pre(images, return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values).pooler_output).numpy()
        cosines = []
        for i, prompt in enumerate(prompts):
            ids = tok([prompt], return_tensors="pt")["input_ids"]
            t = model.text_projection(model.text_model(ids).pooler_output).numpy()[0]
            cosines.append(image[i] @ t / np.linalg.norm(image[i]) / np.linalg.norm(t))
    assert score["clip score"] == pytest.approx(100 * np.mean(cosines), abs=1e-4)

    # No such CLIP: one line naming what to download, no scores.
    capsys.readouterr()
    assert metrics.load_clip("nobody/no-clip") is None
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hf download nobody/no-clip" in err


def test_imagenet_top1_with_stand_in_weights(tmp_path, capsys):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    # A tiny ResNet with five ImageNet-style labels (synonyms after commas), and its processor.
    id2label = {
        0: "tench, Tinca tinca",
        1: "church, church building",
        2: "golf ball",
        3: "parachute, chute",
        4: "gas pump, gasoline pump, petrol pump",
    }
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", id2label=id2label
    )
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    pre = ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0)
    pre.save_pretrained(tmp_path / "resnet")
    images = random_images(10, side=40, seed=2)
    labels = ["tench", "Church", "golf ball", "parachute", "a car"] * 2

    # The reference: the network's logits, argmax, its label's names, by hand.
    model = ResNetForImageClassification.from_pretrained(tmp_path / "resnet").eval()
    with torch.no_grad():
        predicted = model(pre(images, return_tensors="pt")["pixel_values"]).logits.argmax(-1)
    names = [[n.strip().lower() for n in id2label[int(p)].split(",")] for p in predicted]
    hits = [labels[i].lower() in names[i] for i in range(10) if labels[i] != "a car"]

    result = metrics.classifier(images, labels, imagenet=metrics.load_imagenet(tmp_path / "resnet"))
    assert result["top1"] == pytest.approx(sum(hits) / 8)
    assert result["images not scored (class not in ImageNet)"] == 2
    churches = [labels[i].lower() in names[i] for i in (1, 6)]
    assert result["top1 church"] == pytest.approx(sum(churches) / 2)

    # Not on the machine: one line, no score.
    capsys.readouterr()
    assert metrics.classifier(
        images, labels, imagenet=metrics.load_imagenet("nobody/no-resnet")
    ) == {"top1": None}
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "hf download nobody/no-resnet" in err
