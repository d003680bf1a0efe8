"""app.py: the ESD demo in the browser: erase a concept and watch it go, compare, measure, download.

    pip install -r requirements-app.txt && python app.py  # the shipped toy, offline
    python app.py --model CompVis/stable-diffusion-v1-4   # a real SD (a GPU); --host, --port

The page is at http://127.0.0.1:7860. UI only: training is train.train, sampling sampler.generate,
scores evaluate.evaluate, deltas delta.py; flags and checks are cli.py's. A shared server: each
request's work is bounded (--max-iterations, --max-sampling-steps), a waiting page says what it
waits for, outputs/ is swept (--retention-hours, --retention-mb), and SIGTERM saves a running
training as Stop does."""

import contextlib
import copy
import dataclasses
import glob
import math
import os
import signal
import sys
import threading
import time
import traceback
import uuid

import pandas as pd  # gradio's own dependency: its plots take DataFrames
import torch
from starlette.middleware import Middleware  # gradio's own dependency: its server
from starlette.responses import PlainTextResponse

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

# What the demo writes, in the working directory: deltas and Measure's grids; and under it,
# gradio's cache: uploads and the images it serves.
OUTPUTS = "outputs"
UPLOADS = os.path.join(OUTPUTS, "uploads")
# The Erase tab's update interval while training (target: at most 2 s).
UPDATE_S = 1.0
# A preview at most every 3 s, and at most 5% of the training time spent on them.
PREVIEW_S = 3.0
PREVIEW_SHARE = 0.05
PREVIEW_SEED = 0  # the previews' noise
# Images are shown at least CELL pixels wide (the toy's enlarged).
CELL = 192
# Per request. CLIP reads 77 tokens of a prompt (a few hundred characters); a megabyte of text
# would take seconds to tokenize.
MAX_PROMPTS = 8
MAX_CHARS = 1000
MAX_SEEDS = 16
# A request's body, uploads apart (they have their own limit): far past 8 prompts of MAX_CHARS,
# short of a server that holds megabytes for every request.
MAX_BODY = 2**20
# What Compare and Measure read (delta.load): ours, and the official ESD .pt files.
DELTA_TYPES = (".safetensors", ".pt")
# The defaults of --max-iterations and --max-sampling-steps: the DDIM steps a Compare or Measure
# runs over all its batches (a batch: Compare's prompts, or Measure's at one seed; the original
# and the erased apart). On the toy every request they allow takes under 10 s on 2 CPU cores: at
# most Compare's 8 prompts at 60 steps, original and erased, or Measure's 21 prompts at 3 seeds
# (docs/benchmarks.md). A real model: the paper's 1000 iterations; 8 prompts at sample.py's 50
# steps, original and erased, 3 times over.
LIMITS = {
    "toy": dict(max_iterations=5000, max_sampling_steps=120),
    "real": dict(max_iterations=1000, max_sampling_steps=300),
}
# Requests of one kind (Erase; Compare and Measure) in the handlers at once: one works, the others
# say what they wait for. More wait in gradio's queue, their place shown.
WAITING = 4
# outputs/ is swept every SWEEP_S seconds and after every request: what is older than
# --retention-hours goes, then the oldest past --retention-mb (10^6 bytes) in all. The defaults:
SWEEP_S = 10
RETENTION_HOURS = 24
RETENTION_MB = 10_000
# train.py's flags as the Erase tab labels their fields: its messages name the field.
LABELS = {
    "--negative-guidance": "η",
    "--iterations": "iterations",
    "--lr": "learning rate",
    "--seed": "seed",
}


def prompt_lines(text):
    """The prompts of a text box, one a line: 1 to MAX_PROMPTS of them, each of at most MAX_CHARS
    characters, else LoadError."""
    prompts = [p.strip() for p in (text or "").splitlines() if p.strip()]
    if not 0 < len(prompts) <= MAX_PROMPTS:
        raise files.LoadError(f"type 1 to {MAX_PROMPTS} prompts, one a line")
    longest = max(len(p) for p in prompts)
    if longest > MAX_CHARS:
        raise files.LoadError(f"prompts: a line of {longest} characters; at most {MAX_CHARS}")
    return prompts


def number(value, label, kind=float):
    """A gradio Number's `value` as `kind`, else LoadError naming the field by its `label`: an
    empty field is None, and JSON lets NaN, infinity and 400-digit integers through. Ranges are
    checked after."""
    if kind is int and isinstance(value, int):
        return value
    try:
        good = isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer past float's range
        good = False
    if good and kind is int:
        good = float(value).is_integer()
    if not good:
        raise files.LoadError(f"{label} must be a {'whole' if kind is int else 'finite'} number")
    return kind(value)


def limit(label, value, high):
    """`value` is in 1..high, a limit of this server."""
    return (not 1 <= value <= high, f"{label} must be in 1..{high} on this server")


def page_line(message, *paths):
    """`message` as the page shows it: each field named as the page labels it, and files by their
    names, not by their paths on the server."""
    for flag, label in LABELS.items():
        message = message.replace(flag, label)
    for path in filter(None, paths):
        message = message.replace(str(path), os.path.basename(path))
    return message


def refused(e, *paths):
    """The page's error for a refused input `e` (LoadError), in one line; the server's log gets the
    same line, not a traceback."""
    line = page_line(str(e), *paths)
    print(f"refused: {line}", file=sys.stderr, flush=True)
    return gr.Error(line, print_exception=False)


def sweep(folder, max_age_s, max_bytes):
    """Delete the files under `folder` older than max_age_s, then the oldest while they total more
    than max_bytes; then the emptied folders under it. A run's temporary files stay (a dead run's
    are removed at the server's start)."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if ".tmp-" in name:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                found.append((st.st_mtime, st.st_size, path))

    # Oldest first: past the age, or past the size.
    found.sort()
    total = sum(size for _, size, _ in found)
    now = time.time()
    for mtime, size, path in found:
        if now - mtime <= max_age_s and total <= max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        total -= size

    for root, folders, _ in os.walk(folder, topdown=False):
        for name in folders:
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(os.path.join(root, name))


def delta_file(edit):
    """A delta's path (or None) from the page, if it is a file type delta.py reads, else
    LoadError."""
    if edit and not edit.endswith(DELTA_TYPES):
        raise files.LoadError(f"delta: a {' or '.join(DELTA_TYPES)} file, not {edit}")
    return edit


class BodyLimit:
    """ASGI middleware: a request whose body is past MAX_BODY bytes is refused (413) before it is
    read, uploads apart; one without its length too (411)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        answer = None
        if scope["type"] == "http" and not scope["path"].endswith("/upload"):
            headers = dict(scope["headers"])
            length = int(headers.get(b"content-length", 0))
            if b"transfer-encoding" in headers:
                answer = PlainTextResponse("a request must give its length", status_code=411)
            elif length > MAX_BODY:
                line = f"request body of {length} bytes, past this server's limit of {MAX_BODY}"
                answer = PlainTextResponse(line, status_code=413)
        if answer:
            await answer(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Slot:
    """A lock that says what holds it: a request waiting for it tells its page."""

    def __init__(self, name):
        self.name = name  # "the model"
        self.lock = threading.Lock()
        self.holder = None  # what holds it: anything str() describes
        self.since = 0.0

    def wait(self, holder):
        """Take the slot for `holder`; meanwhile, every UPDATE_S, yield the line the page shows."""
        while not self.lock.acquire(timeout=UPDATE_S):
            held = time.time() - self.since
            yield f"Waiting for {self.name}, busy with {self.holder} for {held:.0f} s."
        self.holder = holder
        self.since = time.time()

    def release(self):
        self.holder = "the next request"
        self.lock.release()


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
        try:
            self.image = self._preview(0)
            train.train(self.config, self.sd, self.concepts, on_step=self._on_step)
            self.image = self._preview(len(self.losses))  # the weights as saved
        except (FloatingPointError, files.LoadError) as e:
            # A NaN loss: the settings' fault, a message in the page.
            self.error = page_line(str(e))
        except Exception as e:
            # Anything else is a failure: its traceback in the server's log, a line in the page,
            # and the server goes on.
            traceback.print_exc()
            self.error = files.first_line(e)
        finally:
            # The demo never resumes: no checkpoint (3.25x the delta) stays.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.config.output + delta.RESUME)

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

    def __str__(self):
        """What a page waiting for the training slot shows of this run."""
        done = len(self.losses)
        return f"erasing {self.config.concept!r} (iteration {done}/{self.config.iterations})"


class Demo:
    """What all sessions share: the model's view for Compare and Measure, the training (one at a
    time), the defaults and the limits. A delta reaches Compare and Measure as a file of the
    person's own page: the one trained there, or an upload."""

    def __init__(self, args):
        # train.py's defaults (the toy's for the toy), the model flags included.
        argv = [f"--model={args.model}", "--no-eval"]
        if args.prediction_type:
            argv.append(f"--prediction-type={args.prediction_type}")
        self.defaults = train.parse_args(argv)
        # In float32, as train.py loads it: the demo trains on it.
        self.view = cli.load_model(self.defaults, dtype="float32")
        self.is_toy = args.model == "toy"
        if self.is_toy:
            self.sampling = toy.SAMPLING
        else:
            size = self.view.image_size
            self.sampling = dict(
                steps=sample.DDIM_STEPS, guidance=sample.GUIDANCE, height=size, width=size
            )

        # What one request may cost; on the toy, Measure's seeds follow from it.
        self.max_iterations = args.max_iterations
        self.max_sampling_steps = args.max_sampling_steps
        seed_cost = 2 * self.sampling["steps"]
        self.max_seeds = max(1, min(MAX_SEEDS, args.max_sampling_steps // seed_cost))
        self.retention = (args.retention_hours * 3600, args.retention_mb * 10**6)

        # The view's weights are the original's while the model's slot is free. One training at a
        # time. After a SIGTERM (closing), none starts.
        self.model = Slot("the model")
        self.training = Slot("the training slot (one at a time)")
        self.run = None
        self.closing = False
        # Uploads up to 1.5x the whole model in float32: the 2023 compvis .pt holds all of it.
        models = (self.view.unet, self.view.vae, self.view.text_encoder)
        fp32 = sum(p.numel() * 4 for m in models for p in m.parameters())
        self.upload_limit = int(1.5 * fp32) + 2**20

    def output(self, name):
        """A new path under OUTPUTS for a file called `name`."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return os.path.join(OUTPUTS, f"{stamp}-{name}")

    def sweep(self):
        """Outputs and uploads past --retention-hours or --retention-mb go, the oldest first."""
        sweep(OUTPUTS, *self.retention)

    def sweep_forever(self):
        while True:
            time.sleep(SWEEP_S)
            self.sweep()

    def erase_config(self, concept, method, eta, iterations, lr, xt_from, seed):
        """The TrainConfig of an Erase and its concepts, else LoadError (train.py's checks, the
        output path's included, and this server's limit)."""
        concepts = cli.concepts(concept)
        iterations = number(iterations, "iterations", int)
        cli.refuse(
            [
                (self.closing, "the server is shutting down"),
                (method not in esd.FILTERS, f"method must be one of: {', '.join(esd.FILTERS)}"),
                (
                    xt_from not in esd.XT_FROM,
                    f"x_t source must be one of: {', '.join(esd.XT_FROM)}",
                ),
                (not concepts, "type a concept to erase"),
                (
                    len(concept or "") > MAX_CHARS,
                    f"concept to erase: at most {MAX_CHARS} characters",
                ),
                limit("iterations", iterations, self.max_iterations),
            ]
        )
        name = cli.output_name(concepts)
        config = dataclasses.replace(
            self.defaults,
            concept=concept,
            method=method,
            xt_from=xt_from,
            negative_guidance=number(eta, "η"),
            iterations=iterations,
            lr=number(lr, "learning rate"),
            seed=number(seed, "seed", int),
            output=self.output(f"{method}-{name}.safetensors"),
        )
        return config, train.check(config)

    def erase(self, concept, method, eta, iterations, lr, xt_from, seed, request: gr.Request):
        """train.train in a Run, its progress streamed; the delta saved under OUTPUTS. One at a
        time: meanwhile the others' pages say what they wait for."""
        try:
            config, concepts = self.erase_config(
                concept, method, eta, iterations, lr, xt_from, seed
            )
        except files.LoadError as e:
            raise refused(e) from None
        for line in self.training.wait("a training"):
            yield (line, *[gr.skip()] * 5)
        try:
            yield from self.train(config, concepts, request.session_hash)
        finally:
            self.training.release()
            self.sweep()

    def train(self, config, concepts, session):
        """erase(), holding the training slot."""
        if self.closing:
            raise refused(files.LoadError("the server is shutting down"))

        # A UNet of its own: training changes only the UNet (the VAE and text encoder are shared).
        for line in self.model.wait("a training's copy of it"):
            yield (line, *[gr.skip()] * 5)
        try:
            sd = dataclasses.replace(self.view, unet=copy.deepcopy(self.view.unet))
        finally:
            self.model.release()
        self.run = run = Run(config, concepts, sd, session, self.sampling)
        self.training.holder = run
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
            # One line in the log too; a failure's traceback is there already.
            print(f"failed: {run.error}", file=sys.stderr, flush=True)
            raise gr.Error(run.error, print_exception=False)

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

    def close(self):
        """SIGTERM or Ctrl-C: no training starts any more, and the running one stops, saved as
        Stop saves it."""
        self.closing = True
        run = self.run
        if run:
            print(f"stopping: saving {run}", file=sys.stderr, flush=True)
            run.stop.set()
            run.thread.join()

    def afford(self, cost, what):
        """A request of `cost` sampling steps (`what` spells it out): within
        --max-sampling-steps."""
        high = self.max_sampling_steps
        message = f"{what} = {cost} sampling steps, past this server's limit of {high}"
        return (cost > high, message)

    def compare(self, prompts, seed, steps, guidance, edit):
        """The original above the erased model: the same prompts and noise, without and with the
        delta `edit`."""
        try:
            edit = delta_file(edit)
            prompts = prompt_lines(prompts)
            seed = number(seed, "seed", int)
            steps = number(steps, "DDIM steps", int)
            guidance = number(guidance, "guidance")
            passes = [[], [edit]] if edit else [[]]
            what = f"{steps} DDIM steps"
            if edit:
                what += " × 2 (original and erased)"
            cli.refuse(
                [
                    cli.seed("seed", seed),
                    cli.steps("DDIM steps", steps),
                    self.afford(steps * len(passes), what),
                ]
            )
        except files.LoadError as e:
            raise refused(e, edit) from None
        settings = dict(self.sampling, steps=steps, guidance=guidance)

        # The original weights, then (given a delta) the erased; the original back afterwards.
        for line in self.model.wait(f"a Compare of {len(prompts)} prompts × {what}"):
            yield line, gr.skip(), gr.skip()
        started = time.time()
        rows = []
        try:
            for edits in passes:
                with delta.applied(self.view.unet, *edits):
                    generated = sampler.generate(self.view, prompts, [seed], **settings)
                rows.append(sample.grid([sample.to_pil(generated)], prompts, cell=CELL))
        except files.LoadError as e:
            raise refused(e, edit) from None
        finally:
            self.model.release()
            # The upload, swept with the rest.
            self.sweep()

        status = f"{what}: {time.time() - started:.1f} s."
        if edit:
            erased = gr.update(value=rows[-1], label="erased")
        else:
            erased = gr.update(value=None, label="erased: give a delta")
        yield status, rows[0], erased

    def measure_prompts(self, edit, concept, prompts, seeds):
        """Measure's concept and prompts (None on the toy: evaluate.py's), after refusing
        (LoadError) what it cannot measure or this server would not draw."""
        if edit is None:
            raise files.LoadError("train or upload a delta to measure")
        delta_file(edit)
        seeds = number(seeds, "seeds per prompt", int)
        cli.refuse([limit("seeds per prompt", seeds, self.max_seeds)])
        # The concept typed, else the delta's own (its first).
        typed = (concept or "").strip()
        if len(typed) > MAX_CHARS:
            raise files.LoadError(f"erased concept: at most {MAX_CHARS} characters")
        concept = (typed or files.read_metadata(edit).get("concept", "")).split(",")[0].strip()
        if not concept:
            raise files.LoadError("type the erased concept: this delta does not name it")

        # The toy's prompts are evaluate.py's, for one of its concepts.
        if self.is_toy:
            prompts = None
            try:
                evaluate.toy_prompts(concept)
            except ValueError as e:
                raise files.LoadError(str(e)) from None
        else:
            prompts = prompt_lines(prompts)
        return concept, prompts, seeds

    def measure(self, edit, concept, prompts, seeds):
        """evaluate.py's protocol, base against erased: its report, a bar chart and its grid."""
        try:
            concept, prompts, seeds = self.measure_prompts(edit, concept, prompts, seeds)
        except files.LoadError as e:
            raise refused(e, edit) from None

        for line in self.model.wait(f"a Measure of {seeds} seeds per prompt"):
            yield line, gr.skip(), gr.skip()
        grid = self.output("measure.png")
        try:
            result = evaluate.evaluate(
                self.view, edit, concept, prompts=prompts, seeds=range(seeds), grid=grid
            )
        except files.LoadError as e:
            raise refused(e, edit) from None
        finally:
            self.model.release()
            self.sweep()
        report = f"**{os.path.basename(edit)}**\n```\n{evaluate.format_report(result)}\n```"
        # No CLIP in the local cache: the report says so in one line.
        if not result["base"]:
            yield report, None, grid
            return

        # The bars under the report's names, in the report's order.
        bars = pd.DataFrame(
            [
                {"score": f"{k}: {run}", "model": run, "share": result[key][k]}
                for k in result["base"]
                for run, key in (("base", "base"), ("erased", "edited"))
            ]
        )
        yield report, gr.update(value=bars, sort=list(bars["score"])), grid


def ui(demo):
    """The page: three tabs over the Demo's handlers, their components listed in the handlers'
    argument order."""
    d = demo.defaults
    is_toy = demo.is_toy
    image = dict(type="pil", format="png")
    # The inputs pass their values as sent: the handlers refuse a bad one in one line (gradio's own
    # checks of choices, ranges and file types print a traceback in the server's log).
    delta_input = dict(
        label="delta: the one trained here, or upload one (.safetensors: ESD or LoRA; ESD .pt)",
        type="filepath",
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
                        allow_custom_value=True,
                    ),
                    gr.Number(
                        d.negative_guidance,
                        label="η, negative guidance: the target is e₀ − η (e_c − e₀)",
                    ),
                    gr.Number(d.iterations, label="iterations", elem_id="iterations"),
                    gr.Number(d.lr, label="learning rate (Adam)"),
                    gr.Dropdown(
                        list(esd.XT_FROM),
                        value=d.xt_from,
                        label="x_t source: which weights sample it, "
                        "the model being trained (the paper) or the original (the 2024 code)",
                        allow_custom_value=True,
                    ),
                    gr.Number(d.seed, label="seed"),
                ]
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="train")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column():
                erase_out = [
                    gr.Markdown(
                        "Type a concept and press Train (one training at a time, at most "
                        f"{demo.max_iterations} iterations).",
                        elem_id="status",
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
                    gr.Number(0, label="seed"),
                    gr.Number(demo.sampling["steps"], label="DDIM steps"),
                    gr.Number(demo.sampling["guidance"], label="guidance (CFG scale)"),
                    gr.File(**delta_input),
                ]
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                compare_out = [
                    gr.Markdown(
                        f"At most {demo.max_sampling_steps} DDIM steps a request; with a delta, "
                        "the erased images count apart.",
                        elem_id="compare-status",
                    ),
                    gr.Image(label="original", elem_id="original", **image),
                    gr.Image(label="erased", elem_id="erased", **image),
                ]
        with gr.Tab("Measure"), gr.Row():
            with gr.Column():
                measure_in = [
                    gr.File(**delta_input),
                    gr.Textbox(label="erased concept", placeholder="blank: the delta's own"),
                    gr.Textbox(
                        "a photo of a car\na photo of a house",
                        lines=3,
                        visible=not is_toy,
                        label="prompts, one a line (scored by CLIP, if cached)",
                    ),
                    gr.Number(
                        min(8, demo.max_seeds),
                        label=f"seeds per prompt (1 to {demo.max_seeds} on this server)",
                    ),
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
        # WAITING requests of a kind in the handlers: those not served yet say what they wait for.
        train_button.click(
            demo.erase,
            erase_in,
            [*erase_out, compare_in[-1], measure_in[0]],
            concurrency_limit=WAITING,
        )
        stop_button.click(demo.stop, queue=False)
        generate.click(demo.compare, compare_in, compare_out, concurrency_limit=WAITING)
        measure.click(demo.measure, measure_in, measure_out, concurrency_limit=WAITING)
    return blocks


def clean_outputs():
    """What a killed server left in OUTPUTS: half-written files, checkpoints."""
    os.makedirs(OUTPUTS, exist_ok=True)
    files.remove_leftovers(os.path.join(glob.escape(OUTPUTS), "*"))
    for path in glob.glob(os.path.join(glob.escape(OUTPUTS), "*" + delta.RESUME)):
        os.remove(path)


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
    toy_limits = LIMITS["toy"]
    real_limits = LIMITS["real"]
    for name, what in (
        ("max_iterations", "Erase: the most iterations a training may run"),
        (
            "max_sampling_steps",
            "Compare and Measure: the most DDIM steps a request runs over all its batches",
        ),
    ):
        default = f"{toy_limits[name]} on the toy, {real_limits[name]} on a real model"
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"{what} (default: {default})")
    p.add_argument(
        "--retention-hours",
        type=float,
        default=RETENTION_HOURS,
        help=f"outputs and uploads older than this are deleted (default: {RETENTION_HOURS})",
    )
    p.add_argument(
        "--retention-mb",
        type=float,
        default=RETENTION_MB,
        help="outputs and uploads past this total (10^6 bytes) are deleted, the oldest first "
        f"(default: {RETENTION_MB})",
    )
    args = p.parse_args(argv)
    limits = toy_limits if args.model == "toy" else real_limits
    for name, default in limits.items():
        if getattr(args, name) is None:
            setattr(args, name, default)

    try:
        # Before the model loads.
        cli.refuse(
            [
                (args.max_iterations < 1, "--max-iterations must be at least 1"),
                (args.max_sampling_steps < 1, "--max-sampling-steps must be at least 1"),
                (not args.retention_hours > 0, "--retention-hours must be a positive number"),
                (not args.retention_mb > 0, "--retention-mb must be a positive number"),
            ]
        )
        cli.check_address(args.host, args.port)
        # SIGTERM (kill, systemd, containers) as Ctrl-C; a training it stops is saved (below).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        clean_outputs()
        # gradio's cache (uploads, the images it serves) inside OUTPUTS: swept with it.
        os.environ["GRADIO_TEMP_DIR"] = os.path.abspath(UPLOADS)
        demo = Demo(args)
        demo.sweep()
        threading.Thread(target=demo.sweep_forever, daemon=True).start()

        # Requests run in threads beside each other (a training, a Compare): each computes with one
        # torch thread. Two OpenMP teams on 2 cores made the toy train 2.7x slower, and a Compare
        # at the limit took 60 s instead of 7 on a loaded machine.
        torch.set_num_threads(1)

        # SIGTERM or Ctrl-C: the running training is saved, then gradio closes the server.
        def shut_down(signum, frame):
            demo.close()
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, shut_down)
        signal.signal(signal.SIGINT, shut_down)
        ui(demo).launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=demo.upload_limit,
            show_error=True,
            ssr_mode=False,
            app_kwargs=dict(middleware=[Middleware(BodyLimit)]),
        )
    except (files.LoadError, OSError) as e:
        # A bad flag, a missing model; the port taken since, an unwritable folder.
        line = e if isinstance(e, files.LoadError) else files.first_line(e)
        p.exit(2, f"error: {line}\n")
    except KeyboardInterrupt:
        # Before the server started.
        p.exit(130, "error: interrupted\n")


if __name__ == "__main__":
    main()
