"""cli.py: what the command lines share. train.py, sample.py, evaluate.py and the demo (app.py) take
their model flags from here (one definition and one help each), check numbers and names by the
rules here, and report through run_cli's exit codes: 0 done; 2 bad input, one line on stderr
before any work; 1 a run that failed; 130 interrupted. Reading and writing files is files.py's.
"""

import argparse
import math
import os
import signal
import socket
import sys

import torch

import load_sd
from files import LoadError, first_line
from sampler import NUM_TRAIN_TIMESTEPS, PREDICTIONS

# The largest image side a CLI accepts, in pixels: past every SD model, short of taking the
# machine down.
MAX_SIDE = 16384
# DDIM steps: 1000 would start at t = 1000, past the schedule's end (sampler.ddim_timesteps).
MAX_STEPS = NUM_TRAIN_TIMESTEPS - 1
# Seeds: 0 up to what a signed 64-bit integer (torch.int64) holds.
MAX_SEED = 2**63 - 1
# The longest file-name part made from a concept, in bytes (UTF-8): every file system takes a
# 255-byte name, and the demo adds a stamp, the method and suffixes (.resume.pt.tmp-PID).
MAX_NAME = 64

# The model flags, as argparse keywords. --model has no default here: each CLI gives its own
# (train.py and sample.py SD v1.4 from the hub, evaluate.py and the demo the shipped toy).
MODEL_FLAGS = {
    "model": dict(
        default=None,
        help="a single file (.safetensors, .ckpt), a diffusers folder, a hub id, or 'toy'",
    ),
    "tokenizer": dict(default=None, help="tokenizer folder or hub id, for single-file models"),
    "revision": dict(default=None, help="hub models: branch, tag or commit"),
    "variant": dict(
        default=None,
        help="diffusers folders and hub models: weight files *.VARIANT.*, e.g. fp16",
    ),
    "prediction_type": dict(
        default=None,
        choices=list(PREDICTIONS),
        help="what the UNet predicts (default: a folder's scheduler, a file's metadata, "
        "else v for SD 2.x and epsilon for the others)",
    ),
    "device": dict(default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"),
    "dtype": dict(
        default="float32",
        choices=list(load_sd.DTYPES),
        help="the dtype the model computes in; train.py autocasts to it and keeps the trained "
        "weights in float32",
    ),
}
# Which model: the flags train.py, sample.py and evaluate.py list first ...
SOURCE_FLAGS = ("model", "tokenizer", "revision", "variant", "prediction_type")
# ... and where it computes, listed after their own flags.
COMPUTE_FLAGS = ("device", "dtype")


def model_flag(name, **changes):
    """The argparse keywords of model flag `name` (default, help, choices), updated by `changes`."""
    return {**MODEL_FLAGS[name], **changes}


def add_model_flags(parser, names, model=None):
    """The model flags `names` on `parser`, --model defaulting to `model`; --help shows the
    defaults."""
    for name in names:
        flag = model_flag(name, default=model) if name == "model" else model_flag(name)
        if flag["default"] is not None:
            flag["help"] += f" (default: {flag['default']})"
        parser.add_argument("--" + name.replace("_", "-"), **flag)


def load_model(args, dtype=None):
    """load_sd.load as the model flags of `args` (a namespace or a TrainConfig) say, the weights in
    `dtype` (a DTYPES name), by default in --dtype."""
    return load_sd.load(
        args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=load_sd.DTYPES[dtype or args.dtype],
        revision=args.revision,
        variant=args.variant,
        prediction_type=args.prediction_type,
    )


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# The shared rules. Each gives a (bad, message) pair for refuse(), which raises the first bad one;
# a value of None (a flag not given, its default decided later) passes.


def refuse(rules):
    """Raise LoadError with the message of the first (bad, message) rule that is bad, if any."""
    for bad, message in rules:
        if bad:
            raise LoadError(message)


def finite(flag, value):
    """`value` is a finite number (NaN compares false to everything, so it is refused too)."""
    bad = value is not None and not abs(value) < math.inf
    return (bad, f"{flag} must be a finite number")


def within(flag, value, low, high):
    """`value` is in low..high."""
    bad = value is not None and not low <= value <= high
    return (bad, f"{flag} must be in {low}..{high}")


def steps(flag, value):
    """`value` DDIM steps: 1..MAX_STEPS."""
    return within(flag, value, 1, MAX_STEPS)


def seed(flag, value, images=1):
    """`value` and the seeds after it of `images` images (image i has seed + i) are seeds."""
    bad = value is not None and not 0 <= value <= MAX_SEED + 1 - images
    note = " (image i has seed + i)" if images > 1 else ""
    return (bad, f"{flag} must be in 0..2**63-1{note}")


def side(flag, value, zero=None):
    """An image side in pixels: a multiple of 8 (every SD VAE downsamples 8x, the toy's 4x) in
    8..MAX_SIDE; 0 too where `zero` says what it means."""
    message = f"{flag} must be a multiple of 8 in 8..{MAX_SIDE}"
    if zero:
        message += f" (or 0, {zero})"
    if value is None or (value == 0 and zero):
        return (False, message)
    return (value % 8 != 0 or not 8 <= value <= MAX_SIDE, message)


def existing(flag, paths):
    """Every one of `paths` is a file."""
    missing = [path for path in paths if not os.path.isfile(path)]
    return (bool(missing), f"no such {flag} file: {', '.join(missing)}")


def concepts(text):
    """The concepts of a --concept text: 'a, b' is two."""
    return [concept.strip() for concept in (text or "").split(",") if concept.strip()]


def output_name(concepts):
    """A file-name part for `concepts`: letters and digits kept, anything else "_", "-" between
    concepts, at most MAX_NAME bytes in UTF-8 (cut between two characters)."""
    words = ["".join(ch if ch.isalnum() else "_" for ch in concept) for concept in concepts]
    name = "-".join(words).encode()[:MAX_NAME]
    # A character cut in two at the end is dropped.
    return name.decode(errors="ignore")


def check_address(host, port):
    """Refuse (LoadError), before any work, an address a server cannot listen on: a port outside
    1..65535, a host that is no IPv4 address or name of this machine (gradio 6.31 serves no IPv6),
    a port in use."""
    refuse([(not 0 < port < 2**16, f"--port must be in 1..65535, got {port}")])
    try:
        with socket.socket() as s:
            # As uvicorn binds.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((socket.gethostbyname(host), port))
    except OSError as e:
        raise LoadError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def failure(e, smaller):
    """The one line for a run that failed with `e`, or None for an error that is a bug."""
    if isinstance(e, OSError):
        return f"cannot write {e.filename}: {e.strerror}"
    if isinstance(e, FloatingPointError):
        return str(e)
    out_of_memory = isinstance(e, (MemoryError, torch.OutOfMemoryError))
    if out_of_memory or "allocate memory" in str(e):
        return f"out of memory ({first_line(e)}): try a smaller {smaller}"
    return None


def run_cli(work, leftover=lambda: None, smaller="settings"):
    """work() as a CLI's exit code: 0; or one line on stderr and 2 for bad input (LoadError), 1 for
    a run that failed (a NaN loss, a full disk, a failed allocation: try a `smaller` setting), 130
    for Ctrl-C or SIGTERM. leftover(): what a run that failed or was stopped leaves behind, e.g. its
    last checkpoint, for that line."""
    # SIGTERM (kill, schedulers, containers) is the same as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        work()
        return 0
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        code = 130
        line = "interrupted"
    except (FloatingPointError, OSError, MemoryError, RuntimeError) as e:
        code = 1
        line = failure(e, smaller)
        if line is None:
            # A bug, not the machine: its traceback is what a report needs.
            raise
    print(f"error: {line}; {leftover() or 'nothing saved'}", file=sys.stderr)
    return code
