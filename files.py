"""files.py: reading and writing files safely, for every CLI. Tensors are read without running
pickled code; every output path is checked before any work and written to a temporary name then
renamed, so a crash never leaves half a file where a good one was; a run holds a lock on its
output; bad input is one line (LoadError). Flags and exit codes are cli.py's.
"""

import contextlib
import fcntl
import glob
import os
import shutil

import torch
from PIL import PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file

# The umask, read once (setting it is the only way to read it), then put back.
UMASK = os.umask(0o022)
os.umask(UMASK)


class LoadError(Exception):
    """A one-line, user-facing problem with an input or output file (CLIs print it and exit 2)."""


def first_line(e):
    """`Type: first line of the message` of an exception, for one-line errors."""
    message = str(e).strip()
    if not message:
        return type(e).__name__
    return f"{type(e).__name__}: {message.splitlines()[0]}"


def read_tensors(path):
    """The tensors of a .safetensors file, or of a .ckpt/.pt/.bin read with weights_only (no
    pickled code)."""
    try:
        if path.endswith(".safetensors"):
            obj = load_file(path)
        else:
            obj = torch.load(path, "cpu", weights_only=True)
    except Exception as e:
        # Any file we cannot read is bad input, whatever the library raises.
        raise LoadError(f"cannot read {path}: {first_line(e)}") from None

    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj)  # LDM .ckpt: {"state_dict": ...}
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
    except Exception as e:
        # No such file, a truncated or garbage header: bad input, whatever safetensors raises.
        raise LoadError(f"cannot read {path}: {first_line(e)}") from None


def atomic_write(path, write):
    """write(tmp) into a temporary name beside `path`, then rename: a crash never leaves half a
    file (or half a folder) where a good one was. Files get the usual mode (safetensors would make
    them 0600)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as e:
        # A full disk, say: name the file, not the temporary one.
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def save_png(image, path, texts):
    """A PIL image as a PNG with text chunks ({key: text}, e.g. A1111's "parameters"),
    atomically."""
    info = PngImagePlugin.PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def check_output(path, *, inputs=(), overwrite=True, folder=False):
    """Refuse, before any work, an output path that would destroy something or cannot be written:
    it must be a regular file or absent (no link, device or folder), none of the run's inputs (a
    file, or inside a folder), and absent unless `overwrite` (a `folder` to write: always absent).
    Writability is tried (root ignores mode bits); a killed run's leftover temporary files of this
    path are removed."""
    if path is None:  # no such output asked for
        return None
    path = os.fspath(path)

    # What is there now: nothing, or a file we may replace.
    if folder and os.path.lexists(path):
        raise LoadError(f"{path} exists: choose a new folder (nothing is overwritten)")
    if os.path.islink(path):
        kind = "a symlink"
    elif os.path.isdir(path):
        kind = "a directory"
    elif os.path.lexists(path) and not os.path.isfile(path):
        kind = "a device or pipe"
    else:
        kind = None
    if kind:
        raise LoadError(f"{path} is not a regular file ({kind}): choose another output path")

    # None of the run's inputs, however the path is spelled.
    real = os.path.realpath(path)
    for source in filter(None, map(str, inputs)):
        inside = (real + os.sep).startswith(os.path.realpath(source) + os.sep)
        if os.path.exists(source) and inside:
            raise LoadError(
                f"{path} is an input of this run ({source}): choose another output path"
            )
    if not overwrite and os.path.lexists(path):
        raise LoadError(f"{path} exists: pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(real)):
        raise LoadError(f"output folder does not exist: {os.path.dirname(path) or '.'}")

    # A dead process's half-written file or folder goes.
    remove_leftovers(glob.escape(path))

    # The very name atomic_write writes first: can it be made here?
    probe = f"{path}.tmp-{os.getpid()}"
    try:
        open(probe, "x").close()
        os.remove(probe)
    except OSError as e:
        raise LoadError(f"cannot write {path}: {e.strerror}") from None
    return path


def remove_leftovers(pattern):
    """Remove what atomic_write left of the paths matching the glob `pattern` in processes that
    died: the files and folders PATH.tmp-PID."""
    for leftover in glob.glob(pattern + ".tmp-*"):
        if not _alive(leftover.rpartition(".tmp-")[2]):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)


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
    """An exclusive lock on `path` (a file `path`.lock, removed after) while a run writes it: a
    second run on the same output is refused instead of mixing its files with the first's."""
    lock = f"{path}.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Removed by a run that just ended: the lock we hold is on a file no one else sees.
            if os.stat(lock).st_ino != os.fstat(f.fileno()).st_ino:
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
