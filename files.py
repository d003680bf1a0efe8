"""files.py: reading and writing files safely, for every CLI. Tensors are read without running pickled code;
every output path is checked before any work and written to a temporary name then renamed, so a crash never
leaves half a file where a good one was; a run holds a lock on its output; bad input is one line (LoadError).
"""

import argparse
import contextlib
import fcntl
import glob
import os
import shutil
import signal
import socket
import sys

import torch
from PIL import PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file

UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(UMASK)
MAX_SIDE = 16384  # largest image side a CLI accepts, in pixels: past every SD model, short of taking the machine down


class LoadError(Exception):
    """A one-line, user-facing problem with an input or output file (CLIs print it and exit 2)."""


def refuse(problems):
    """Raise LoadError with the message of the first (bad, message) pair whose `bad` is true, if any."""
    for message in [message for bad, message in problems if bad][:1]:
        raise LoadError(message)


def first_line(e):
    """`Type: first line of the message` of an exception, for one-line errors."""
    return (
        f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        if str(e).strip()
        else type(e).__name__
    )


def read_tensors(path):
    """The tensors of a .safetensors file, or of a .ckpt/.pt/.bin read with weights_only (no pickled code)."""
    try:
        obj = (
            load_file(path)
            if path.endswith(".safetensors")
            else torch.load(path, "cpu", weights_only=True)
        )
    except Exception as e:  # any file we cannot read is bad input, whatever the library raises
        raise LoadError(f"cannot read {path}: {first_line(e)}") from None
    obj = (
        obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    )  # LDM .ckpt: {"state_dict": ...}
    if not isinstance(obj, dict):
        raise LoadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def read_metadata(path):
    """The string metadata of a .safetensors file ({} for files of other kinds)."""
    if not str(path).endswith(".safetensors"):
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (
        Exception
    ) as e:  # no such file, a truncated or garbage header: bad input, whatever safetensors raises
        raise LoadError(f"cannot read {path}: {first_line(e)}") from None


def atomic_write(path, write):
    """write(tmp) into a temporary name beside `path`, then rename: a crash never leaves half a file
    (or half a folder) where a good one was. Files get the usual mode (safetensors would make them 0600)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, say: name the file, not the temporary one
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def save_png(image, path, texts):
    """A PIL image as a PNG with text chunks ({key: text}, e.g. A1111's "parameters"), atomically."""
    info = PngImagePlugin.PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def check_output(path, *, inputs=(), overwrite=True, folder=False):
    """Refuse, before any work, an output path that would destroy something or cannot be written: it must be a
    regular file or absent (no link, device or folder), none of the run's inputs (a file, or inside a folder),
    and absent unless `overwrite` (a `folder` to write: always absent). Writability is tried (root ignores mode
    bits); a killed run's leftover temporary files of this path are removed."""
    if path is None:  # no such output asked for
        return None
    path = os.fspath(path)
    if folder and os.path.lexists(path):
        raise LoadError(f"{path} exists: choose a new folder (nothing is overwritten)")
    if os.path.islink(path) or os.path.lexists(path) and not os.path.isfile(path):
        kind = (
            "a symlink"
            if os.path.islink(path)
            else "a directory"
            if os.path.isdir(path)
            else "a device or pipe"
        )
        raise LoadError(f"{path} is not a regular file ({kind}): choose another output path")
    real = os.path.realpath(path)
    for source in filter(None, map(str, inputs)):
        if os.path.exists(source) and (real + os.sep).startswith(os.path.realpath(source) + os.sep):
            raise LoadError(
                f"{path} is an input of this run ({source}): choose another output path"
            )
    if not overwrite and os.path.lexists(path):
        raise LoadError(f"{path} exists: pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(real)):
        raise LoadError(f"output folder does not exist: {os.path.dirname(path) or '.'}")
    for leftover in glob.glob(
        glob.escape(path) + ".tmp-*"
    ):  # a dead process's half-written file or folder
        if not _alive(leftover.rpartition(".tmp-")[2]):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)
    probe = (
        f"{path}.tmp-{os.getpid()}"  # the very name atomic_write writes first: can it be made here?
    )
    try:
        open(probe, "x").close()
        os.remove(probe)
    except OSError as e:
        raise LoadError(f"cannot write {path}: {e.strerror}") from None
    return path


def check_address(host, port):
    """Refuse (LoadError), before any work, an address a server cannot listen on: a port outside 1..65535, a host
    that is no IPv4 address or name of this machine (gradio 6.31 serves no IPv6), a port in use."""
    refuse([(not 0 < port < 2**16, f"--port must be in 1..65535, got {port}")])
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((socket.gethostbyname(host), port))
    except OSError as e:
        raise LoadError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def _alive(pid):
    """Whether process `pid` (a string of digits) is running."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on `path` (a file `path`.lock, removed after) while a run writes it: a second run on the
    same output is refused instead of mixing its files with the first's."""
    lock = f"{path}.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if (
                os.stat(lock).st_ino != os.fstat(f.fileno()).st_ino
            ):  # removed by a run that just ended
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise LoadError(
                f"another run is writing {path} ({lock} is locked): wait for it or choose another "
                "--output"
            ) from None
        try:
            yield path
        finally:
            os.remove(lock)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run_cli(work, leftover=lambda: None, smaller="settings"):
    """work() as a CLI's exit code: 0, or one line on stderr and 2 for bad input (LoadError), 1 for a run that
    failed (a NaN loss, a full disk, a failed allocation: try a `smaller` setting), 130 for Ctrl-C or SIGTERM.
    leftover(): what a run that failed or was stopped leaves behind, e.g. its last checkpoint, for that line."""
    signal.signal(
        signal.SIGTERM, signal.default_int_handler
    )  # kill, schedulers, containers: the same as Ctrl-C
    try:
        work()
        return 0
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        code, line = 130, "interrupted"
    except (FloatingPointError, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not (
            isinstance(e, torch.OutOfMemoryError) or "allocate memory" in str(e)
        ):
            raise  # a bug, not the machine: its traceback is what a report needs
        code = 1
        line = (
            f"cannot write {e.filename}: {e.strerror}"
            if isinstance(e, OSError)
            else str(e)
            if isinstance(e, FloatingPointError)
            else f"out of memory ({first_line(e)}): try a smaller {smaller}"
        )
    print(f"error: {line}; {leftover() or 'nothing saved'}", file=sys.stderr)
    return code
