"""Read PyTorch's LEGACY (pre-1.6, non-zip) ``.pth`` files into numpy, without torch.

Layout of such a file: five pickles then raw storage bytes:

1. the magic number ``0x1950a86a20f9469cfc6c``; 2. the protocol version ``1001``;
3. a sys-info dict (endianness, C type sizes);
4. the object itself (here an ``OrderedDict`` of tensors): tensors are
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls whose
   storages are *persistent ids* ``('storage', torch.XStorage, key, location, numel,
   view_metadata)`` resolved after the pickle;
5. the list of storage keys, in the order their data follows;
   then per key: an int64 (little-endian) element count and ``count * itemsize`` bytes.

The unpickler is restricted: ``find_class`` resolves only ``collections.OrderedDict``,
the two tensor rebuild functions and the ``torch.*Storage`` types, each to a local
stand-in; any other global (``os.system``, ``builtins.eval``, ...) raises
``UnsafeCheckpointError`` before anything is called. Every structural inconsistency
raises ``CheckpointFormatError``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class CheckpointFormatError(ValueError):
    """The file is not a well-formed legacy PyTorch checkpoint."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The pickle references a global outside the allow-list."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only records the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# BFloat16 has no numpy dtype: read as uint16, widened to float32 when materialised.
_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in {
        "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
        "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
        "ByteStorage": "u1", "BoolStorage": "?",
    }.items()
}  # fmt: skip


class _Storage:
    """Lazy storage handle: data is filled in after the main pickle has been read."""

    __slots__ = ("key", "type", "numel", "data")

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key, self.type, self.numel, self.data = key, storage_type, numel, None


class _TensorRef:
    """Result of ``_rebuild_tensor_v2``: a view description, materialised later."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        if not isinstance(storage, _Storage):
            raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
        ints = (offset, *size, *stride)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) or len(size) != len(
            stride
        ):
            raise CheckpointFormatError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:  # fmt: skip
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise CheckpointFormatError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name}: only OrderedDict, torch tensor rebuild functions "
                "and torch storage types are allowed in a weights file"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if self.storages is None:
            raise CheckpointFormatError(f"unexpected persistent id {pid!r} outside the main object")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointFormatError(f"malformed storage reference {pid!r}")
        if view is not None:
            raise CheckpointFormatError(f"storage views (legacy view_metadata {view!r}) are not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        elif storage.type is not storage_type or storage.numel != numel:
            raise CheckpointFormatError(f"storage {key} referenced with two types or sizes")
        return storage


def _load_pickle(f: BinaryIO, what: str, storages: dict[str, _Storage] | None = None) -> Any:
    try:
        return _RestrictedUnpickler(f, storages).load()
    except CheckpointFormatError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, TypeError from a bad REDUCE, ...
        raise CheckpointFormatError(f"cannot read the {what} pickle: {type(exc).__name__}: {exc}") from exc


def _read_storage(f: BinaryIO, storage: _Storage, little_endian: bool) -> None:
    header = f.read(8)
    if len(header) != 8:
        raise CheckpointFormatError(f"file truncated: no element count for storage {storage.key}")
    (count,) = struct.unpack("<q", header)
    if count != storage.numel:
        raise CheckpointFormatError(
            f"storage {storage.key}: {count} elements in the file but {storage.numel} in its reference"
        )
    dtype = storage.type.dtype if little_endian else storage.type.dtype.newbyteorder(">")
    nbytes = count * dtype.itemsize
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise CheckpointFormatError(f"file truncated: storage {storage.key} has {len(raw)} of {nbytes} bytes")
    storage.data = np.frombuffer(raw, dtype=dtype)


def _materialise(ref: _TensorRef) -> np.ndarray:
    storage = ref.storage
    if any(s == 0 for s in ref.size):
        last = ref.offset
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset > storage.numel or (all(ref.size) and last >= storage.numel):
        raise CheckpointFormatError(
            f"tensor (offset {ref.offset}, size {ref.size}, stride {ref.stride}) reaches past the end "
            f"of storage {storage.key} ({storage.numel} elements)"
        )
    data = storage.data
    itemsize = data.dtype.itemsize
    if ref.size:
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset :], shape=ref.size, strides=[s * itemsize for s in ref.stride], writeable=False
        )
        array = np.ascontiguousarray(view)
    else:  # 0-d tensor (as_strided would give shape (1,))
        array = np.array(data[ref.offset])
    if storage.type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def read_legacy_torch(f: BinaryIO) -> dict[str, np.ndarray]:
    """Read a legacy checkpoint from a binary stream; see ``read_legacy_torch_file``."""
    magic = _load_pickle(f, "magic number")
    if magic != MAGIC_NUMBER:
        raise CheckpointFormatError(
            f"wrong magic number {magic!r}: not a legacy PyTorch file (zip-format .pt files are not supported)"
        )
    protocol = _load_pickle(f, "protocol version")
    if protocol != PROTOCOL_VERSION:
        raise CheckpointFormatError(f"unsupported legacy protocol version {protocol!r} (expected {PROTOCOL_VERSION})")
    sys_info = _load_pickle(f, "sys info")
    if not isinstance(sys_info, dict):
        raise CheckpointFormatError(f"sys info is a {type(sys_info).__name__}, not a dict")
    little_endian = bool(sys_info.get("little_endian", True))

    storages: dict[str, _Storage] = {}
    obj = _load_pickle(f, "main", storages)
    keys = _load_pickle(f, "storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CheckpointFormatError("the storage key list is not a list of distinct strings")
    if set(keys) != set(storages):
        raise CheckpointFormatError(
            f"storage keys listed {sorted(set(keys) - set(storages))[:5]} without reference / "
            f"referenced {sorted(set(storages) - set(keys))[:5]} without data"
        )
    for key in keys:
        _read_storage(f, storages[key], little_endian)
    if f.read(1):
        raise CheckpointFormatError("trailing bytes after the last storage")

    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise CheckpointFormatError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        out[name] = _materialise(value)
    return out


def read_legacy_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy (non-zip) PyTorch ``state_dict`` file as an ordered ``{name: array}``.

    Arrays are C-contiguous numpy copies with the storages' dtypes (``float32`` for
    ``FloatStorage``; ``num_batches_tracked`` counters are ``int64``). Raises
    ``UnsafeCheckpointError`` for a forbidden pickle global and ``CheckpointFormatError``
    (a ``ValueError``) for anything malformed: wrong magic or protocol, element counts
    that disagree, truncation, trailing bytes.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"PK":
        raise CheckpointFormatError(f"{path} is a zip-format PyTorch file; this reader handles the legacy format only")
    try:
        return read_legacy_torch(io.BytesIO(data))
    except CheckpointFormatError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
