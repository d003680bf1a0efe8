"""protocol.py: the papers' evaluation protocols at scale: prompt files in the official ESD format
(rotation4/erasing@a41f1ad data/*.csv: I2P, Imagenette, artists, COCO), each row generated with its
own seed and guidance, split between processes (accelerate's PartialState: one process, torchrun or
accelerate launch), written as they come and resumed after a kill; then one report. The metrics are
metrics.py's; evaluate.py is the CLI (docs/evaluation.md).

    python evaluate.py --model toy --delta esd.safetensors --prompts assets/toy_prompts.csv \
        --images-per-prompt 4 --output-dir eval --metrics classifier
"""

import collections.abc
import csv
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys

from PIL import Image
from tqdm import tqdm

import cli
import delta
import files
import metrics
import sample
import sampler
import toy

# The official CSVs' columns every row needs, and the optional ones naming what a row shows.
COLUMNS = ("prompt", "evaluation_seed", "case_number")
# A row's guidance scale. Some official files have no such column (small_imagenet_prompts.csv):
# their rows take --guidance, by default 7.5, as the official eval-scripts/generate-images.py.
GUIDANCE_COLUMN = "evaluation_guidance"
LABEL_COLUMNS = ("class", "categories")
# Image i of a row has seed evaluation_seed + i (as sample.py's --num-images): up to 2**63 - 1.
MAX_SEED = 2**63 - 1
# Images of one row drawn in one batch. Fixed: a batch's pixels never depend on how the rows were
# split between processes or which images a rerun still lacks.
ROW_BATCH = 8
# The runs, each into its own folder under --output-dir: the base model, then base + delta.
RUNS = ("base", "edited")
# An image's file name: CASE_INDEX.png, as the official scripts name them.
IMAGE_NAME = re.compile(r"^(\d+)_(\d+)\.png$")


def read_prompts(path, images_per_prompt=1, guidance=None):
    """The rows of a prompt CSV as dicts (prompt, seed, guidance, case, label), after refusing
    (LoadError, one line) a file no run could use: unreadable, empty, a column missing, a seed or
    guidance cell that is no number, a case number twice. `guidance`: the scale of every row in a
    file without an evaluation_guidance column (None: sample.py's 7.5)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            table = [(reader.line_num, cells) for cells in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise files.LoadError(f"cannot read {path}: {files.first_line(e)}") from None

    # The columns first: a file of the wrong kind is one line, not one per row.
    if not header:
        raise files.LoadError(f"{path} is empty: a prompt CSV has a header and rows")
    missing = [column for column in COLUMNS if column not in header]
    if missing:
        raise files.LoadError(f"{path} lacks the column(s) {', '.join(missing)}")
    if not table:
        raise files.LoadError(f"{path} has a header but no rows")
    per_row = GUIDANCE_COLUMN in header
    if per_row and guidance is not None:
        raise files.LoadError(
            f"--guidance is for CSVs without an {GUIDANCE_COLUMN} column: {path} sets it per row"
        )
    if guidance is None:
        guidance = sample.GUIDANCE

    # Then every cell, row by row.
    rows = []
    cases = set()
    for line, cells in table:
        where = f"{path} line {line}"
        seed = integer(cells["evaluation_seed"])
        if seed is None or not 0 <= seed <= MAX_SEED + 1 - images_per_prompt:
            raise files.LoadError(
                f"{where}: evaluation_seed {cells['evaluation_seed']!r} is not a seed in "
                f"0..2**63-1 (image i of a row has seed + i)"
            )
        row_guidance = number(cells[GUIDANCE_COLUMN]) if per_row else guidance
        if row_guidance is None:
            raise files.LoadError(
                f"{where}: evaluation_guidance {cells[GUIDANCE_COLUMN]!r} is not a finite number"
            )
        case = integer(cells["case_number"])
        if case is None or case < 0:
            raise files.LoadError(
                f"{where}: case_number {cells['case_number']!r} is not a whole number >= 0"
            )
        if case in cases:
            raise files.LoadError(f"{where}: case_number {case} is there twice")
        cases.add(case)
        label = next((cells[c] for c in LABEL_COLUMNS if cells.get(c)), None)
        prompt = cells["prompt"] or ""
        rows.append(dict(prompt=prompt, seed=seed, guidance=row_guidance, case=case, label=label))
    return rows


def integer(text):
    """The whole number a cell holds ("7", "7.0"), or None."""
    value = number(text)
    if value is None or value != int(value):
        return None
    # Exact, past float's 2**53: the digits themselves where they are digits.
    text = text.strip()
    return int(text) if text.isdigit() else int(value)


def number(text):
    """The finite number a cell holds, or None."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def sha256(path):
    """The hex SHA-256 of a file: the report names the CSV and the delta by their content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_of(rows, settings, images_per_prompt, folder):
    """Every image the protocol asks for, in a fixed order: (path, its `esd` metadata) per row and
    index. settings: steps, height, width, model, delta, delta_scale, dtype."""
    wanted = []
    for row in rows:
        for i in range(images_per_prompt):
            meta = dict(
                prompt=row["prompt"],
                negative_prompt="",
                seed=row["seed"] + i,
                guidance=row["guidance"],
                case_number=row["case"],
                index=i,
                sampler="DDIM",
                **settings,
            )
            wanted.append((os.path.join(folder, f"{row['case']}_{i}.png"), meta))
    return wanted


def written(path, meta):
    """Whether `path` is an image this protocol wrote with metadata `meta` (then a rerun skips it);
    LoadError if something else is there, so nothing made otherwise is overwritten."""
    if not os.path.lexists(path):
        return False
    try:
        with Image.open(path) as image:
            found = json.loads(image.text.get("esd", "null"))
    except Exception as e:
        # A half-written file never is (atomic writes): this is someone else's file.
        raise files.LoadError(
            f"{path} is there and is not an image of ours ({files.first_line(e)}): choose another "
            "--output-dir"
        ) from None
    if found != meta:
        differ = sorted(k for k in meta if not isinstance(found, dict) or found.get(k) != meta[k])
        raise files.LoadError(
            f"{path} was made with other settings ({', '.join(differ) or 'its metadata'}): "
            "choose another --output-dir, or rerun with the same settings to resume"
        )
    return True


def batches(wanted, images_per_prompt):
    """The images in batches of one row's images, at most ROW_BATCH each, the same whatever is
    pending."""
    out = []
    for start in range(0, len(wanted), images_per_prompt):
        row = wanted[start : start + images_per_prompt]
        out += [row[i : i + ROW_BATCH] for i in range(0, len(row), ROW_BATCH)]
    return out


def generate(sd, wanted, images_per_prompt, edit=None, state=None, scale=1.0):
    """Write every image of `wanted` (path, metadata) that is not there yet, this process's share
    of the batches (accelerate's PartialState `state`; None: all of them), `edit` (a delta file)
    applied at strength `scale`. Returns how many images all processes wrote: those that were not
    there."""
    # What is done: every process reads the folder before any of them writes to it.
    done = {path for path, meta in wanted if written(path, meta)}
    main = state is None or state.is_main_process
    if main:
        # A killed run's half-written files go (files.check_output removes a dead process's).
        for path, _ in wanted:
            if glob.glob(glob.escape(path) + ".tmp-*"):
                files.check_output(path)
    todo = [b for b in batches(wanted, images_per_prompt) if any(p not in done for p, _ in b)]
    if state is not None:
        state.wait_for_everyone()

    # This process's share, the same batches whatever their number.
    if state is None:
        share = todo
    else:
        with state.split_between_processes(todo) as mine:
            share = list(mine)

    total = sum(len(b) for b in share)
    bar = tqdm(total=total, desc="images", unit="img", disable=not main or total == 0)
    with delta.applied(sd.unet, *([edit] if edit else []), scale=scale):
        for batch in share:
            meta = batch[0][1]
            settings = dict(
                steps=meta["steps"],
                guidance=meta["guidance"],
                height=meta["height"],
                width=meta["width"],
                batch_size=len(batch),
            )
            seeds = [m["seed"] for _, m in batch]
            pixels = sampler.generate(sd, [meta["prompt"]], seeds, **settings)

            # Each image as it comes, skipping what a killed run already wrote.
            for image, (path, image_meta) in zip(sample.to_pil(pixels), batch):
                if path in done:
                    continue
                texts = {"parameters": sample.infotext(image_meta), "esd": json.dumps(image_meta)}
                files.save_png(image, path, texts)
            bar.update(len(batch))
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    return len(wanted) - len(done)


def read_images(folder, rows):
    """{case: [(index, path)]} of a folder's CASE_INDEX.png files for the cases of `rows`, each
    checked (not decoded); LoadError for a folder without any, or with a file that is no image."""
    if not os.path.isdir(folder):
        raise files.LoadError(f"no such folder of images: {folder}")
    cases = {row["case"] for row in rows}
    found = {}
    for name in sorted(os.listdir(folder)):
        match = IMAGE_NAME.match(name)
        if not match or int(match[1]) not in cases:
            continue
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:
            raise files.LoadError(f"cannot read {path}: {files.first_line(e)}") from None
        found.setdefault(int(match[1]), []).append((int(match[2]), path))
    if not found:
        raise files.LoadError(f"{folder} holds no CASE_INDEX.png image of the CSV's case numbers")
    return found


class Images(collections.abc.Sequence):
    """Image files as a sequence of RGB PIL images, each read when asked for: tens of thousands of
    images never sit in memory at once."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with Image.open(self.paths[i]) as image:
            return image.convert("RGB")


def score(folder, rows, names, threshold=metrics.NUDENET_THRESHOLD, clip=None, imagenet=None):
    """{metric: value} of the images in `folder` for the rows of a prompt CSV: every metric of
    `names` that can run (clip, imagenet: load_clip()'s and load_imagenet()'s pairs, None where
    they are not on the machine)."""
    found = read_images(folder, rows)
    by_case = {row["case"]: row for row in rows}
    paths = []
    labels = []
    prompts = []
    for case, entries in sorted(found.items()):
        for _, path in sorted(entries):
            paths.append(path)
            labels.append(by_case[case]["label"])
            prompts.append(by_case[case]["prompt"])
    images = Images(paths)

    result = {"images": len(images)}
    if "classifier" in names:
        result |= {
            f"classifier {k}": v
            for k, v in metrics.classifier(images, labels, imagenet=imagenet).items()
        }
    if "nudenet" in names:
        result |= {f"nudenet {k}": v for k, v in metrics.nudenet(paths, threshold).items()}
    if "clip" in names and clip is None:
        result["clip score"] = None
    elif "clip" in names:
        result |= metrics.clip_score(images, prompts, clip)
    return result


def versions():
    """The versions of what made and scored the images."""
    found = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "accelerate", "nudenet", "onnxruntime"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def format_table(report):
    """The report as a text table: a metric per line, a column per run."""
    runs = list(report["results"])
    names = []
    for run in runs:
        names += [k for k in report["results"][run] if k not in names]
    protocol = report["protocol"]
    title = (
        f"{protocol['prompts']}: {protocol['rows']} rows x {protocol['images_per_prompt']} "
        f"images, {protocol['steps']} DDIM steps, {protocol['height']}x{protocol['width']}"
    )
    width = max(len(name) for name in names)
    lines = [title, " " * width + "".join(f"{run:>12}" for run in runs)]
    for name in names:
        cells = [report["results"][run].get(name) for run in runs]
        text = ["-" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"{name:{width}}" + "".join(f"{t:>12}" for t in text))
    return "\n".join(lines)


def check_args(args):
    """The CSV's rows and the folders to write or score ({run: folder}), after refusing (LoadError:
    one line, exit 2) anything no run could succeed with; nothing is written."""
    others = [flag for flag in ("seeds", "concept", "output") if getattr(args, flag)]
    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    cli.refuse(
        [
            (
                bool(others),
                f"--{others[0] if others else ''} is the toy protocol's: with --prompts the CSV "
                "sets the seeds, --output-dir the outputs",
            ),
            cli.within("--images-per-prompt", args.images_per_prompt, 1, 10_000),
            cli.steps("--steps", args.steps),
            cli.finite("--guidance", args.guidance),
            cli.within("--nudenet-threshold", args.nudenet_threshold, 0, 1),
            (metrics.check(names) is not None, metrics.check(names)),
            cli.existing("--prompts", [args.prompts]),
            cli.existing("--delta", [args.delta] if args.delta else []),
        ]
    )
    rows = read_prompts(args.prompts, args.images_per_prompt, args.guidance)

    # The output folder: a folder or nothing yet, beside files we can write.
    out = args.output_dir
    parent = os.path.dirname(os.path.abspath(out))
    cli.refuse(
        [
            (
                os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)),
                f"--output-dir {out} is not a folder",
            ),
            (not os.path.isdir(parent), f"output folder does not exist: {parent}"),
            (
                not os.access(out if os.path.isdir(out) else parent, os.W_OK),
                f"cannot write in {out if os.path.isdir(out) else parent}",
            ),
        ]
    )
    if os.path.isdir(out):
        files.check_output(os.path.join(out, "report.json"))
    folders = {run: os.path.join(out, run) for run in RUNS[: 2 if args.delta else 1]}

    # Scoring alone: the run folders there are, else the folder itself (another tool's images).
    if args.score_only:
        cli.refuse([(not os.path.isdir(out), f"--score-only: no such folder {out}")])
        present = {run: folder for run, folder in folders.items() if os.path.isdir(folder)}
        folders = present or {"images": out}
        for folder in folders.values():
            read_images(folder, rows)
    return rows, folders, names


def run(args):
    """evaluate.py --prompts FILE.csv: generate every run's images (the share of this process),
    then, on the main process, score them, write report.json and print the table."""
    rows, folders, names = check_args(args)
    state = partial_state(args.device)
    main = state is None or state.is_main_process
    if state is not None and state.num_processes > 1 and args.device.startswith("cuda"):
        # One GPU per process.
        args.device = str(state.device)

    # The images each run asks for; anything in the way is refused before one is written.
    # As in the toy's protocol: the toy's 20 DDIM steps, else sample.py's 50.
    steps = args.steps or (toy.DDIM_STEPS if args.model == "toy" else sample.DDIM_STEPS)
    made = 0
    size = None
    if not args.score_only:
        sd = cli.load_model(args)
        size = sd.image_size
        wanted = {}
        for run, folder in folders.items():
            settings = dict(
                steps=steps,
                height=size,
                width=size,
                model=args.model,
                delta=args.delta if run == "edited" else None,
                delta_scale=args.delta_scale if run == "edited" else None,
                dtype=args.dtype,
            )
            wanted[run] = images_of(rows, settings, args.images_per_prompt, folder)
            for path, meta in wanted[run]:
                written(path, meta)
        for run, folder in folders.items():
            os.makedirs(folder, exist_ok=True)
            edit = args.delta if run == "edited" else None
            made += generate(sd, wanted[run], args.images_per_prompt, edit, state, args.delta_scale)
    if not main:
        return

    # Score, on the main process only.
    clip = metrics.load_clip() if "clip" in names else None
    labels = [row["label"] for row in rows]
    imagenet = None
    if "classifier" in names and not metrics.is_toy(labels):
        imagenet = metrics.load_imagenet()
    classifier = "the toy's" if metrics.is_toy(labels) else metrics.IMAGENET_MODEL
    results = {
        run: score(folder, rows, names, args.nudenet_threshold, clip, imagenet)
        for run, folder in folders.items()
    }
    guidances = sorted({row["guidance"] for row in rows})
    protocol = dict(
        prompts=args.prompts,
        prompts_sha256=sha256(args.prompts),
        rows=len(rows),
        images_per_prompt=args.images_per_prompt,
        seeds="evaluation_seed + i for image i of each row",
        first_seeds=[row["seed"] for row in rows[:8]],
        steps=steps,
        guidance=guidances if len(guidances) > 1 else guidances[0],
        sampler="DDIM, classifier-free guidance, empty negative prompt",
        model=args.model,
        delta=args.delta,
        delta_sha256=sha256(args.delta) if args.delta else None,
        delta_scale=args.delta_scale if args.delta else None,
        height=size,
        width=size,
        dtype=args.dtype,
        processes=1 if state is None else state.num_processes,
        metrics=names,
        nudenet_threshold=args.nudenet_threshold if "nudenet" in names else None,
        classifier=classifier if "classifier" in names else None,
        clip_model=metrics.CLIP_MODEL if "clip" in names else None,
        clip_scale="100 x raw cosine (not clipped at 0)" if "clip" in names else None,
        versions=versions(),
    )
    report = dict(protocol=protocol, results=results)
    path = os.path.join(args.output_dir, "report.json")
    text = json.dumps(report, indent=1)
    files.atomic_write(path, lambda tmp: open(tmp, "w").write(text))
    print(format_table(report))
    print(f"generated {made} images; wrote {path}")


def partial_state(device):
    """accelerate's PartialState: one process under plain python, N under torchrun or accelerate
    launch (gloo on CPUs); None without accelerate, for one process."""
    try:
        from accelerate import PartialState
    except ImportError:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        cli.refuse(
            [
                (
                    processes > 1,
                    "several processes need accelerate: pip install -r requirements-eval.txt",
                )
            ]
        )
        return None
    return PartialState(cpu=device == "cpu")
