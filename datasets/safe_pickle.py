"""A restricted unpickler for dataset files that come as pickles (the CIFAR "python version" batches).

`pickle.load` runs whatever callable a file names, so an untrusted file can execute code. The CIFAR
batches hold only builtin containers, strings, ints and uint8 NumPy arrays; this unpickler resolves
exactly the globals such files reference and refuses every other one with a clear error.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptDatasetError


def _numpy_reconstruct():
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # NumPy ≥ 2 renamed the module
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy has no multiarray._reconstruct")


# (module, name) → object. The CIFAR files were written by Python 2's cPickle with NumPy 1.x, hence the
# `numpy.core` names; files re-pickled by Python 3 (protocol ≤ 2) spell bytes as `_codecs.encode`.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: dataset pickles may only hold builtin containers and NumPy arrays"
            ) from None


def load_pickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Unpickle `path` admitting only the types dataset batches hold; any problem → CorruptDatasetError.

    `encoding="latin1"` decodes Python 2 byte strings (NumPy array buffers included) byte for byte,
    as torchvision does for these files.
    """
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CorruptDatasetError(f"{path}: not a valid dataset pickle ({type(exc).__name__}: {exc})") from None
