"""app.py: the ESD demo in the browser: erase a concept and watch it go, compare, measure, download.

    pip install -r requirements-app.txt && python app.py  # the shipped toy, offline
    python app.py --model CompVis/stable-diffusion-v1-4   # a real SD (a GPU); --host, --port

The page is at http://127.0.0.1:7860. UI only: training is train.train, sampling sampler.generate,
scores evaluate.evaluate, deltas delta.py; flags and checks are cli.py's."""

import copy
import dataclasses
import math
import os
import threading
import time
import uuid

import pandas as pd  # gradio's own dependency: its plots take DataFrames
import torch

import cli
import delta
import esd
import evaluate
import files
import sample
import sampler
import toy
import train

# Read when gradio is imported: it calls nothing outside.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr  # noqa: E402

# What the demo writes, in the working directory: deltas and Measure's grids.
OUTPUTS = "outputs"
# The Erase tab's update interval while training (target: at most 2 s).
UPDATE_S = 1.0
# A preview at most every 3 s, and at most 5% of the training time spent on them.
PREVIEW_S = 3.0
PREVIEW_SHARE = 0.05
PREVIEW_SEED = 0  # the previews' noise
# Images are shown at least CELL pixels wide (the toy's enlarged).
CELL = 192
# Per request.
MAX_PROMPTS = 8
MAX_SEEDS = 16


def prompt_lines(text):
    """The prompts of a text box, one a line: 1 to MAX_PROMPTS of them, else ValueError."""
    prompts = [p.strip() for p in (text or "").splitlines() if p.strip()]
    if not 0 < len(prompts) <= MAX_PROMPTS:
        raise ValueError(f"type 1 to {MAX_PROMPTS} prompts, one a line")
    return prompts


def number(value, name, kind=float):
    """A gradio Number's `value` as `kind`, else ValueError (its message is shown in the page): an
    empty field is None, and JSON lets NaN and infinity through. Ranges are cli.py's rules."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a {'whole' if kind is int else 'finite'} number")
    return kind(value)


class Run:
    """One training: train.train in a thread of its own, on a UNet of its own, and what the page
    shows of it."""

    def __init__(self, config, concepts, sd, session, sampling):
        self.config = config
        self.concepts = concepts
        self.sd = sd
        self.session = session
        self.sampling = sampling
        self.losses = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.error = None
        self.image = None
        self.before = None
        # (And next_preview: the first preview sets it, before any step.)
        self.started = time.time()

    def _train(self):
        # Beside the server's OpenMP teams, two threads made the toy train 2.7x slower on 2 cores.
        torch.set_num_threads(1)
        try:
            self.image = self._preview(0)
            train.train(self.config, self.sd, self.concepts, on_step=self._on_step)
            self.image = self._preview(len(self.losses))  # the weights as saved
        except Exception as e:
            # A NaN loss, or anything else: a message in the page, and the server goes on.
            if isinstance(e, (FloatingPointError, files.LoadError)):
                self.error = str(e)
            else:
                self.error = files.first_line(e)

    def _on_step(self, iteration, loss):
        """train.train's hook, between two steps: the weights hold still."""
        self.losses.append(loss)
        if time.time() >= self.next_preview:
            self.image = self._preview(iteration)
        return self.stop.is_set()

    def _preview(self, iteration):
        """The concept's prompt through the current weights at a fixed seed, beside the
        original's."""
        t0 = time.time()
        generated = sampler.generate(self.sd, self.concepts[:1], [PREVIEW_SEED], **self.sampling)
        image = sample.to_pil(generated)[0]
        self.before = self.before or image
        self.next_preview = time.time() + max(PREVIEW_S, (time.time() - t0) / PREVIEW_SHARE)
        titles = (f"{self.concepts[0]}: before", f"iteration {iteration}")
        return sample.grid([[self.before, image]], titles, cell=CELL)

    def progress(self):
        """The status line and the loss curve."""
        # (losses grows meanwhile: read its length once.)
        done = len(self.losses)
        total = self.config.iterations
        left = (time.time() - self.started) / max(done, 1) * (total - done)
        if done:
            loss = self.losses[done - 1]
            status = f"Iteration **{done}/{total}** · loss {loss:.4f} · {left:.0f} s left"
        else:
            status = "Starting…"
        curve = pd.DataFrame({"iteration": range(1, done + 1), "loss": self.losses[:done]})
        return status, curve


class Demo:
    """What all sessions share: the model's view for Compare and Measure, the training (one at a
    time), the defaults. A delta reaches Compare and Measure as a file of the person's own page:
    the one trained there, or an upload."""

    def __init__(self, source, prediction_type=None):
        # train.py's defaults (the toy's for the toy), the model flags included.
        argv = [f"--model={source}", "--no-eval"]
        if prediction_type:
            argv.append(f"--prediction-type={prediction_type}")
        self.defaults = train.parse_args(argv)
        # In float32, as train.py loads it: the demo trains on it.
        self.view = cli.load_model(self.defaults, dtype="float32")
        self.is_toy = source == "toy"
        if self.is_toy:
            self.sampling = toy.SAMPLING
        else:
            size = self.view.image_size
            self.sampling = dict(
                steps=sample.DDIM_STEPS, guidance=sample.GUIDANCE, height=size, width=size
            )
        # The view's weights are the original's while the lock is free.
        self.lock = threading.Lock()
        self.run = None
        # Uploads up to 1.5x the whole model in float32: the 2023 compvis .pt holds all of it.
        models = (self.view.unet, self.view.vae, self.view.text_encoder)
        fp32 = sum(p.numel() * 4 for m in models for p in m.parameters())
        self.upload_limit = int(1.5 * fp32) + 2**20

    def output(self, name):
        """A new path under OUTPUTS for a file called `name`."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return os.path.join(OUTPUTS, f"{stamp}-{name}")

    def erase(self, concept, method, eta, iterations, lr, xt_from, seed, request: gr.Request):
        """train.train in a Run, its progress streamed; the delta saved under OUTPUTS. One at a
        time (concurrency_limit=1)."""
        name = cli.output_name(cli.concepts(concept))
        config = dataclasses.replace(
            self.defaults,
            concept=concept,
            method=method,
            xt_from=xt_from,
            negative_guidance=number(eta, "η"),
            iterations=number(iterations, "iterations", int),
            lr=number(lr, "learning rate"),
            seed=number(seed, "seed", int),
            output=self.output(f"{method}-{name}.safetensors"),
        )
        # train.py's checks, the output path's included.
        concepts = train.check(config)

        # A UNet of its own: training changes only the UNet (the VAE and text encoder are shared).
        with self.lock:
            sd = dataclasses.replace(self.view, unet=copy.deepcopy(self.view.unet))
        self.run = run = Run(config, concepts, sd, request.session_hash, self.sampling)
        run.thread.start()

        # The progress and the latest preview (gradio caches it by hash) until the run ends.
        try:
            while run.thread.is_alive():
                run.thread.join(UPDATE_S)
                yield (*run.progress(), run.image, *[gr.skip()] * 3)
        finally:
            # Also when the page goes away: the run stops, saved as it is.
            run.stop.set()
            run.thread.join()
            self.run = None
        if run.error:
            raise gr.Error(run.error)

        # The delta: to download, and as Compare's and Measure's.
        done = len(run.losses)
        if done == config.iterations:
            how = "Done"
        else:
            how = f"Stopped at iteration {done}/{config.iterations}"
        seconds = time.time() - run.started
        status = f"{how} in {seconds:.0f} s; saved **{os.path.basename(config.output)}**."
        yield (status, run.progress()[1], run.image, *[config.output] * 3)

    def stop(self, request: gr.Request):
        """Stop this session's training, if it is the one running; what was trained is saved."""
        run = self.run
        if run and run.session == request.session_hash:
            run.stop.set()

    def compare(self, prompts, seed, steps, guidance, edit):
        """The original above the erased model: the same prompts and noise, without and with the
        delta `edit`."""
        prompts = prompt_lines(prompts)
        seed = number(seed, "seed", int)
        steps = number(steps, "steps", int)
        cli.refuse([cli.seed("seed", seed), cli.steps("steps", steps)])
        settings = dict(self.sampling, steps=steps, guidance=number(guidance, "guidance"))

        # The original weights, then (given a delta) the erased; the original back afterwards.
        rows = []
        with self.lock:
            for edits in ([], [edit]) if edit else ([],):
                with delta.applied(self.view.unet, *edits):
                    generated = sampler.generate(self.view, prompts, [seed], **settings)
                rows.append(sample.grid([sample.to_pil(generated)], prompts, cell=CELL))
        if edit:
            erased = gr.update(value=rows[-1], label="erased")
        else:
            erased = gr.update(value=None, label="erased: give a delta")
        return rows[0], erased

    def measure(self, edit, concept, prompts, seeds):
        """evaluate.py's protocol, base against erased: its report, a bar chart and its grid."""
        if edit is None:
            raise ValueError("train or upload a delta to measure")
        prompts = None if self.is_toy else prompt_lines(prompts)
        seeds = number(seeds, "seeds", int)
        cli.refuse([cli.within("seeds", seeds, 1, MAX_SEEDS)])
        # The concept typed, else the delta's own (its first).
        typed = (concept or "").strip()
        concept = (typed or files.read_metadata(edit).get("concept", "")).split(",")[0].strip()
        if not concept:
            raise ValueError("type the erased concept: this delta does not name it")

        with self.lock:
            grid = self.output("measure.png")
            result = evaluate.evaluate(
                self.view, edit, concept, prompts=prompts, seeds=range(seeds), grid=grid
            )
        report = f"**{os.path.basename(edit)}**\n```\n{evaluate.format_report(result)}\n```"
        # No CLIP in the local cache: the report says so in one line.
        if not result["base"]:
            return report, None, grid

        # The bars under the report's names, in the report's order.
        bars = pd.DataFrame(
            [
                {"score": f"{k}: {run}", "model": run, "share": result[key][k]}
                for k in result["base"]
                for run, key in (("base", "base"), ("erased", "edited"))
            ]
        )
        return report, gr.update(value=bars, sort=list(bars["score"])), grid


def ui(demo):
    """The page: three tabs over the Demo's handlers, their components listed in the handlers'
    argument order."""
    d = demo.defaults
    is_toy = demo.is_toy
    image = dict(type="pil", format="png")
    delta_file = dict(
        label="delta: the one trained here, or upload one (.safetensors: ESD or LoRA; ESD .pt)",
        type="filepath",
        file_types=[".safetensors", ".pt"],
    )
    with gr.Blocks(title="ESD: erasing concepts", analytics_enabled=False) as blocks:
        gr.Markdown(f"## ESD: erasing concepts from diffusion models\nModel `{demo.view.source}`")
        with gr.Tab("Erase"), gr.Row():
            with gr.Column():
                erase_in = [
                    gr.Textbox(
                        label="concept to erase ('a, b' erases both)",
                        elem_id="concept",
                        placeholder="circle" if is_toy else "Van Gogh",
                    ),
                    gr.Dropdown(
                        [(f"{m}: {esd.METHODS.get(m, '')}", m) for m in esd.FILTERS],
                        value=d.method,
                        label="method: which weights train",
                    ),
                    gr.Number(
                        d.negative_guidance,
                        label="η, negative guidance: the target is e₀ − η (e_c − e₀)",
                    ),
                    gr.Number(d.iterations, label="iterations", precision=0, elem_id="iterations"),
                    gr.Number(d.lr, label="learning rate (Adam)"),
                    gr.Radio(
                        list(esd.XT_FROM),
                        value=d.xt_from,
                        label="x_t source: which weights sample it, "
                        "the model being trained (the paper) or the original (the 2024 code)",
                    ),
                    gr.Number(d.seed, label="seed", precision=0),
                ]
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="train")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column():
                erase_out = [
                    gr.Markdown(
                        "Type a concept and press Train (one training at a time).", elem_id="status"
                    ),
                    gr.LinePlot(x="iteration", y="loss", label="loss", height=220, elem_id="curve"),
                    gr.Image(label="preview", **image),
                    gr.File(label="the trained delta", interactive=False, elem_id="download"),
                ]
        with gr.Tab("Compare"), gr.Row():
            with gr.Column():
                compare_in = [
                    gr.Textbox(
                        "a circle\na red circle\na blue square" if is_toy else "a photo of a car",
                        lines=3,
                        label="prompts, one a line",
                    ),
                    gr.Number(0, label="seed", precision=0),
                    gr.Number(demo.sampling["steps"], label="DDIM steps", precision=0),
                    gr.Number(demo.sampling["guidance"], label="guidance (CFG scale)"),
                    gr.File(**delta_file),
                ]
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                compare_out = [
                    gr.Image(label="original", elem_id="original", **image),
                    gr.Image(label="erased", elem_id="erased", **image),
                ]
        with gr.Tab("Measure"), gr.Row():
            with gr.Column():
                measure_in = [
                    gr.File(**delta_file),
                    gr.Textbox(label="erased concept", placeholder="blank: the delta's own"),
                    gr.Textbox(
                        "a photo of a car\na photo of a house",
                        lines=3,
                        visible=not is_toy,
                        label="prompts, one a line (scored by CLIP, if cached)",
                    ),
                    gr.Slider(1, MAX_SEEDS, 8, step=1, label="seeds per prompt"),
                ]
                measure = gr.Button("Measure", variant="primary", elem_id="measure")
            with gr.Column(scale=2):
                measure_out = [
                    gr.Markdown(
                        "The toy's protocol (evaluate.py): a classifier judges every image."
                        if is_toy
                        else "CLIP zero-shot scores, when a CLIP model is cached here."
                    ),
                    gr.BarPlot(
                        x="score",
                        y="share",
                        color="model",
                        y_lim=[0, 1],
                        x_label_angle=-30,
                        label="share of images",
                        height=260,
                    ),
                    gr.Image(
                        label="grid: base (top rows) and erased, the same seeds", type="filepath"
                    ),
                ]
        train_button.click(
            demo.erase, erase_in, [*erase_out, compare_in[-1], measure_in[0]], concurrency_limit=1
        )
        stop_button.click(demo.stop, queue=False)
        generate.click(demo.compare, compare_in, compare_out)
        measure.click(demo.measure, measure_in, measure_out)
    return blocks


def main(argv=None):
    p = cli.ArgumentParser(
        description="The ESD demo in the browser: erase, compare, measure, download."
    )
    cli.add_model_flags(p, ("model", "prediction_type"), model="toy")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="IPv4 address or name to serve on; 0.0.0.0: anyone on the network "
        "(docs/cli.md, 'app.py: the demo')",
    )
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    try:
        # Before the model loads.
        cli.check_address(args.host, args.port)
        os.makedirs(OUTPUTS, exist_ok=True)
        demo = Demo(args.model, args.prediction_type)
        ui(demo).launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=demo.upload_limit,
            show_error=True,
        )
    except (files.LoadError, OSError) as e:
        # A missing model; the port taken since, an unwritable folder.
        line = e if isinstance(e, files.LoadError) else files.first_line(e)
        p.exit(2, f"error: {line}\n")


if __name__ == "__main__":
    main()
