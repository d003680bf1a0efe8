"""files.py: reading and writing files safely. Tensors are read without running pickled code; every output
is written to a temporary name and renamed, so a crash never leaves half a file where a good one was.
"""
import os
import shutil

import torch
from safetensors.torch import load_file

UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(UMASK)


class LoadError(Exception):
    """A one-line, user-facing problem with an input or output file (CLIs print it and exit 2)."""


def first_line(e):
    """`Type: first line of the message` of an exception, for one-line errors."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__


def read_tensors(path):
    """The tensors of a .safetensors file, or of a .ckpt/.pt/.bin read with weights_only (no pickled code)."""
    try:
        obj = load_file(path) if path.endswith(".safetensors") else torch.load(path, "cpu", weights_only=True)
    except Exception as e:  # any file we cannot read is bad input, whatever the library raises
        raise LoadError(f"cannot read {path}: {first_line(e)}") from None
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj  # LDM .ckpt: {"state_dict": ...}
    if not isinstance(obj, dict):
        raise LoadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def atomic_write(path, write):
    """write(tmp) into a temporary name beside `path`, then rename: a crash never leaves half a file
    (or half a folder) where a good one was. Files get the usual mode (safetensors would make them 0600)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)
