"""app.py: the ESD demo in the browser: erase a concept and watch it go, compare, measure, download.

    pip install -r requirements-app.txt && python app.py   # the shipped toy, offline, at http://127.0.0.1:7860
    python app.py --model CompVis/stable-diffusion-v1-4    # a real SD (a GPU); --host, --port as usual

UI only: training is train.train, sampling sampler.generate, scores evaluate.evaluate, deltas delta.py."""

import copy
import dataclasses
import math
import os
import threading
import time
import uuid

import pandas as pd  # gradio's own dependency: its plots take DataFrames
import torch

import delta
import esd
import evaluate
import files
import load_sd
import sample
import sampler
import toy
import train

os.environ["GRADIO_ANALYTICS_ENABLED"] = (
    "False"  # read when gradio is imported: it calls nothing outside
)
import gradio as gr  # noqa: E402

OUTPUTS = "outputs"  # what the demo writes, in the working directory: deltas and Measure's grids
UPDATE_S = 1.0  # the Erase tab's update interval while training (target: at most 2 s)
PREVIEW_S, PREVIEW_SHARE = (
    3.0,
    0.05,
)  # a preview at most every 3 s, and at most 5% of the training time on them
PREVIEW_SEED, CELL = (
    0,
    192,
)  # the previews' noise; images are shown at least CELL pixels wide (the toy's enlarged)
MAX_PROMPTS, MAX_SEEDS, MAX_STEPS = 8, 16, 999  # per request


def prompt_lines(text):
    """The prompts of a text box, one a line: 1 to MAX_PROMPTS of them, else ValueError."""
    prompts = [p.strip() for p in (text or "").splitlines() if p.strip()]
    if not 0 < len(prompts) <= MAX_PROMPTS:
        raise ValueError(f"type 1 to {MAX_PROMPTS} prompts, one a line")
    return prompts


def number(value, name, kind=float, low=-math.inf, high=math.inf):
    """`value` as an int or a finite float in [low, high], else ValueError (its message is shown in the page)."""
    if not (
        isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
    ):  # None: an empty field
        within = f" in {low}..{high}" if math.isfinite(low) else ""
        raise ValueError(f"{name} must be a {'whole' if kind is int else 'finite'} number{within}")
    return kind(value)


class Run:
    """One training: train.train in a thread of its own, on a UNet of its own, and what the page shows of it."""

    def __init__(self, config, concepts, sd, session, sampling):
        self.config, self.concepts, self.sd, self.session, self.sampling = (
            config,
            concepts,
            sd,
            session,
            sampling,
        )
        self.losses, self.stop, self.thread = (
            [],
            threading.Event(),
            threading.Thread(target=self._train, daemon=True),
        )
        self.error = self.image = self.before = None
        self.started = time.time()  # (and next_preview: the first preview sets it, before any step)

    def _train(self):
        torch.set_num_threads(
            1
        )  # beside the server's OpenMP teams, two made the toy train 2.7x slower on 2 cores
        try:
            self.image = self._preview(0)
            train.train(self.config, self.sd, self.concepts, on_step=self._on_step)
            self.image = self._preview(len(self.losses))  # the weights as saved
        except (
            Exception
        ) as e:  # a NaN loss, or anything else: a message in the page, and the server goes on
            self.error = (
                str(e)
                if isinstance(e, (FloatingPointError, files.LoadError))
                else files.first_line(e)
            )

    def _on_step(
        self, iteration, loss
    ):  # train.train's hook, between two steps: the weights hold still
        self.losses.append(loss)
        if time.time() >= self.next_preview:
            self.image = self._preview(iteration)
        return self.stop.is_set()

    def _preview(self, iteration):
        """The concept's prompt through the current weights at a fixed seed, beside the original's."""
        t0 = time.time()
        image = sample.to_pil(
            sampler.generate(self.sd, self.concepts[:1], [PREVIEW_SEED], **self.sampling)
        )[0]
        self.before = self.before or image
        self.next_preview = time.time() + max(PREVIEW_S, (time.time() - t0) / PREVIEW_SHARE)
        return sample.grid(
            [[self.before, image]],
            (f"{self.concepts[0]}: before", f"iteration {iteration}"),
            cell=CELL,
        )

    def progress(self):
        """The status line and the loss curve."""
        done, total = len(self.losses), self.config.iterations
        left = (time.time() - self.started) / max(done, 1) * (total - done)
        status = (
            f"Iteration **{done}/{total}** · loss {self.losses[done - 1]:.4f} · {left:.0f} s left"
            if done
            else "Starting…"
        )
        return status, pd.DataFrame(
            {"iteration": range(1, done + 1), "loss": self.losses[:done]}
        )  # (it grows)


class Demo:
    """What all sessions share: the model's view for Compare and Measure, the training (one at a time), the defaults.
    A delta reaches Compare and Measure as a file of the person's own page: the one trained there, or an upload."""

    def __init__(self, source, prediction_type=None):
        self.defaults = train.parse_args(
            [f"--model={source}", "--no-eval"]
        )  # train.py's (the toy's for the toy)
        self.view = load_sd.load(
            source, device=self.defaults.device, prediction_type=prediction_type
        )
        self.is_toy = source == "toy"
        self.sampling = (
            toy.SAMPLING
            if self.is_toy
            else dict(
                steps=sample.DDIM_STEPS,
                guidance=sample.GUIDANCE,
                height=self.view.image_size,
                width=self.view.image_size,
            )
        )
        self.lock, self.run = (
            threading.Lock(),
            None,
        )  # the view's weights are the original's while the lock is free
        fp32 = sum(
            p.numel() * 4
            for m in (self.view.unet, self.view.vae, self.view.text_encoder)
            for p in m.parameters()
        )
        self.upload_limit = (
            int(1.5 * fp32) + 2**20
        )  # 1.5x the whole model: the 2023 compvis .pt holds all of it

    def output(self, name):
        return os.path.join(
            OUTPUTS, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{name}"
        )

    def erase(self, concept, method, eta, iterations, lr, xt_from, seed, request: gr.Request):
        """train.train in a Run, its progress streamed; the delta saved under OUTPUTS. One at a time (concurrency_limit=1)."""
        slug = "".join(ch if ch.isalnum() else "_" for ch in str(concept))[:64]
        config = dataclasses.replace(
            self.defaults,
            concept=concept,
            method=method,
            xt_from=xt_from,
            negative_guidance=number(eta, "η"),
            iterations=number(iterations, "iterations", int),
            lr=number(lr, "learning rate"),
            seed=number(seed, "seed", int),
            output=self.output(f"{method}-{slug}.safetensors"),
        )
        concepts = train.check(config)  # train.py's checks, the output path's included
        with self.lock:  # a UNet of its own: training changes only the UNet (the VAE and text encoder are shared)
            sd = dataclasses.replace(self.view, unet=copy.deepcopy(self.view.unet))
        self.run = run = Run(config, concepts, sd, request.session_hash, self.sampling)
        run.thread.start()
        try:
            while run.thread.is_alive():
                run.thread.join(UPDATE_S)
                yield (
                    *run.progress(),
                    run.image,
                    *[gr.skip()] * 3,
                )  # the latest preview (gradio caches it by hash)
        finally:
            run.stop.set()  # also when the page goes away: the run stops, saved as it is
            run.thread.join()
            self.run = None
        if run.error:
            raise gr.Error(run.error)
        done = len(run.losses)
        how = (
            "Done"
            if done == config.iterations
            else f"Stopped at iteration {done}/{config.iterations}"
        )
        yield (
            f"{how} in {time.time() - run.started:.0f} s; saved **{os.path.basename(config.output)}**.",
            run.progress()[1],
            run.image,
            *[config.output] * 3,
        )  # to download, and to Compare's and Measure's delta

    def stop(self, request: gr.Request):
        """Stop this session's training, if it is the one running; what was trained is saved."""
        run = self.run
        if run and run.session == request.session_hash:
            run.stop.set()

    def compare(self, prompts, seed, steps, guidance, edit):
        """The original above the erased model: the same prompts and noise, without and with the delta `edit`."""
        prompts, seeds = prompt_lines(prompts), [number(seed, "seed", int, 0, 2**63 - 1)]
        settings = dict(
            self.sampling,
            steps=number(steps, "steps", int, 1, MAX_STEPS),
            guidance=number(guidance, "guidance"),
        )
        rows = []
        with self.lock:
            for edits in (
                ([], [edit]) if edit else ([],)
            ):  # the original weights, then (given a delta) the erased
                with delta.applied(
                    self.view.unet, *edits
                ):  # the original weights back afterwards, always
                    generated = sampler.generate(self.view, prompts, seeds, **settings)
                rows.append(sample.grid([sample.to_pil(generated)], prompts, cell=CELL))
        return rows[0], gr.update(
            value=rows[-1] if edit else None, label="erased" if edit else "erased: give a delta"
        )

    def measure(self, edit, concept, prompts, seeds):
        """evaluate.py's protocol, base against erased: its report, a bar chart and its grid."""
        if edit is None:
            raise ValueError("train or upload a delta to measure")
        prompts, seeds = (
            None if self.is_toy else prompt_lines(prompts),
            number(seeds, "seeds", int, 1, MAX_SEEDS),
        )
        concept = (
            ((concept or "").strip() or files.read_metadata(edit).get("concept", ""))
            .split(",")[0]
            .strip()
        )
        if not concept:
            raise ValueError("type the erased concept: this delta does not name it")
        with self.lock:
            grid = self.output("measure.png")
            result = evaluate.evaluate(
                self.view, edit, concept, prompts=prompts, seeds=range(seeds), grid=grid
            )
        report = f"**{os.path.basename(edit)}**\n```\n{evaluate.format_report(result)}\n```"
        if not result["base"]:  # no CLIP in the local cache: the report says so in one line
            return report, None, grid
        bars = pd.DataFrame(
            [
                {
                    "score": f"{k}: {run}",
                    "model": run,
                    "share": result[key][k],
                }  # the report's names
                for k in result["base"]
                for run, key in (("base", "base"), ("erased", "edited"))
            ]
        )
        return (
            report,
            gr.update(value=bars, sort=list(bars["score"])),
            grid,
        )  # in the report's order


def ui(demo):
    """The page: three tabs over the Demo's handlers, their components listed in the handlers' argument order."""
    d, image, is_toy = demo.defaults, dict(type="pil", format="png"), demo.is_toy
    delta_file = dict(
        label="delta: the one trained here, or upload one (.safetensors, official ESD .pt)",
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
    p = files.ArgumentParser(
        description="The ESD demo in the browser: erase, compare, measure, download."
    )
    p.add_argument(
        "--model",
        default="toy",
        help="'toy' (offline), a single file, a diffusers folder or a hub id",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="IPv4 address or name to serve on; 0.0.0.0: anyone (README)",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--prediction-type", default=None, choices=load_sd.PREDICTIONS, help=load_sd.PREDICTION_HELP
    )
    args = p.parse_args(argv)
    try:
        files.check_address(args.host, args.port)  # before the model loads
        os.makedirs(OUTPUTS, exist_ok=True)
        demo = Demo(args.model, args.prediction_type)
        ui(demo).launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=demo.upload_limit,
            show_error=True,
        )
    except (
        files.LoadError,
        OSError,
    ) as e:  # a missing model; the port taken since, an unwritable folder
        p.exit(2, f"error: {e if isinstance(e, files.LoadError) else files.first_line(e)}\n")


if __name__ == "__main__":
    main()
