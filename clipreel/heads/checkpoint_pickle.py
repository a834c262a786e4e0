"""Unpickling the pickles inside torch's zip archives without importing or running anything.

Both `torch.save` (since PyTorch 1.6) and `torch.jit.save` write a zip: `<name>/data.pkl` is a
pickle whose tensors point (by persistent id `("storage", <storage class>, key, location,
numel)`) to raw storages stored as `<name>/data/<key>`. A plain `pickle.load` of `data.pkl`
imports whatever classes the pickle names and calls them; `ArchiveUnpickler` resolves names
from a fixed table of its own functions instead:

- tensors are rebuilt from the archive's storage bytes (`torch._utils._rebuild_tensor_v2` and
  kin, all re-implemented here as views of a tensor made from those bytes);
- a few harmless constructors are allowed (OrderedDict, set, torch dtypes, torch.Size);
- TorchScript objects (classes named `__torch__.*`) become `ScriptObject`s: plain holders of the
  qualified class name and the pickled state, on which no `__setstate__` is ever called;
- any other name is refused (`UnknownGlobal`), or, with `drop_unknown`, becomes a `Dropped`
  placeholder that swallows whatever the pickle feeds it and is removed afterwards
  (`without_dropped`).

May import: torch, clipreel.errors.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from typing import Any

import torch

# torch's legacy storage classes, as pickles name them, and the dtype of their elements
# (torch/storage.py: the _LegacyStorage subclasses).
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,  # bytes; _rebuild_tensor_v3 gives the dtype
}
# torch.float32 & co. by the name a pickle uses ("float32"); read from the module's namespace, so
# that no lazy import of a torch submodule can be triggered by a name in the pickle.
DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class UnknownGlobal(Exception):
    """The pickle names a class or function the reader does not rebuild."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"{module}.{name}")


class ScriptObject:
    """A TorchScript object as pickled: its qualified class name and its state, untouched.

    Subclassed once per class name (see `ArchiveUnpickler.find_class`); `__setstate__` here only
    keeps the state (a dict of attributes, or whatever the class's own __getstate__ returned).
    """

    qualified_name = ""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state) -> None:
        self.state = state


class Dropped:
    """An object of a class the reader does not rebuild: inert, it keeps nothing it is given.

    Subclassed once per class name (see `ArchiveUnpickler.find_class`), so that the name is
    known; the pickle may construct it (NEWOBJ, REDUCE), fill it (SETITEMS, APPENDS) and set
    its state (BUILD): every such call is accepted and ignored.
    """

    qualified_name = ""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass


class _StorageType:
    """What a storage class name resolves to: the dtype its bytes hold."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _TensorType:
    """What torch.Tensor and nn.Parameter resolve to: a type name for `_rebuild_from_type`, not
    callable (the real classes could be asked by the pickle to allocate any amount of memory)."""


TENSOR_TYPE = _TensorType()


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2): a view of the storage (a 1-D tensor of its elements)."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_tensor_v3(storage: torch.Tensor, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    """torch._utils._rebuild_tensor_v3: the storage holds bytes; `dtype` says what they are."""
    return storage.view(dtype).as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_unused) -> torch.Tensor:
    """torch._utils._rebuild_parameter(_with_state): the plain tensor, not an nn.Parameter."""
    return data


def _rebuild_from_type(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: tensors and parameters only; other types are dropped."""
    if new_type is TENSOR_TYPE:
        return func(*args)
    if isinstance(new_type, type) and issubclass(new_type, Dropped):
        return new_type()
    raise UnknownGlobal("torch._tensor", f"_rebuild_from_type_v2 of {new_type!r}")


def _identity(value, *_unused):
    """torch.jit._pickle.build_intlist & co., restore_type_tag: the value itself."""
    return value


def _encode(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode, as protocol-2 pickles use it to carry bytes (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise UnknownGlobal("_codecs", f"encode({encoding!r})")
    return text.encode("latin1")


# (module, name) -> what the unpickler puts in its place.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): TENSOR_TYPE,  # kept as a plain tensor
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _encode,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    **{("torch", name): dtype for name, dtype in DTYPES.items()},
    **{
        ("torch.jit._pickle", name): _identity
        for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")
    },
}


class ArchiveUnpickler(pickle.Unpickler):
    """Unpickles one pickle record of a torch zip archive (see the module docstring).

    `script_objects`: build `ScriptObject`s for `__torch__.*` classes (TorchScript archives).
    `drop_unknown`: any other unknown name becomes a `Dropped` placeholder instead of raising
    `UnknownGlobal`.
    """

    def __init__(self, archive: TorchArchive, record: str, *, script_objects: bool, drop_unknown: bool):
        self._file = archive.zip.open(archive.prefix + record)
        super().__init__(self._file)
        self.archive = archive
        self.script_objects = script_objects
        self.drop_unknown = drop_unknown
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if self.script_objects and (module == "__torch__" or module.startswith("__torch__.")):
            return self._class_for(module, name, ScriptObject)
        if self.drop_unknown:
            return self._class_for(module, name, Dropped)
        raise UnknownGlobal(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id {pid!r} names no storage class")
        return self.archive.storage(key, storage_type.dtype, numel)

    def close(self) -> None:
        self._file.close()

    def _class_for(self, module: str, name: str, base: type) -> type:
        """One subclass of `base` per class name, carrying that name."""
        key = (module, name)
        if key not in self._classes:
            self._classes[key] = type(name, (base,), {"qualified_name": f"{module}.{name}"})
        return self._classes[key]


class TorchArchive:
    """A zip written by torch.save or torch.jit.save: its record prefix, storages and pickles."""

    def __init__(self, zip_file: zipfile.ZipFile):
        self.zip = zip_file
        names = zip_file.namelist()
        pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"expected one <name>/data.pkl record, found {len(pickles)}")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.names = set(names)
        byteorder_record = self.prefix + "byteorder"
        if byteorder_record in self.names and zip_file.read(byteorder_record).strip() not in (b"", b"little"):
            raise pickle.UnpicklingError("the archive was written on a big-endian machine")
        self._storages: dict[str, torch.Tensor] = {}

    @property
    def is_torchscript(self) -> bool:
        """TorchScript archives hold a constants.pkl record; torch.save archives do not."""
        return self.prefix + "constants.pkl" in self.names

    def load(self, record: str = "data.pkl", *, script_objects: bool = False, drop_unknown: bool = False):
        """The object pickled in `record` (see ArchiveUnpickler for the two switches)."""
        unpickler = ArchiveUnpickler(self, record, script_objects=script_objects, drop_unknown=drop_unknown)
        try:
            return unpickler.load()
        finally:
            unpickler.close()

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Storage `key` as a 1-D tensor of `numel` elements of `dtype`, read once and shared."""
        if key not in self._storages:
            record = f"{self.prefix}data/{key}"
            if record not in self.names:
                raise pickle.UnpicklingError(f"the storage record {record} is missing")
            size = numel * torch.empty((), dtype=dtype).element_size()
            data = bytearray(size)
            with self.zip.open(record) as handle:
                if handle.readinto(memoryview(data)) != size:
                    raise pickle.UnpicklingError(f"the storage record {record} holds fewer than {size} bytes")
            self._storages[key] = torch.frombuffer(data, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        stored = self._storages[key]
        if stored.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is used with two dtypes ({stored.dtype}, {dtype})")
        return stored


def dropped_names(value) -> set[str]:
    """The class names of the `Dropped` placeholders in `value` (in its dicts, lists, tuples and sets)."""
    if isinstance(value, Dropped):
        return {value.qualified_name}
    if isinstance(value, dict):
        return set().union(*(dropped_names(key) | dropped_names(item) for key, item in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return set().union(*(dropped_names(item) for item in value))
    return set()


def without_dropped(value):
    """`value` with every `Dropped` placeholder removed: a dict entry or set item holding one is
    left out, a list or tuple item becomes None (so positions keep their meaning). OrderedDicts
    become plain dicts."""
    if isinstance(value, dict):
        return {
            key: without_dropped(item)
            for key, item in value.items()
            if not isinstance(key, Dropped) and not isinstance(item, Dropped)
        }
    if isinstance(value, (list, tuple)):
        items = [None if isinstance(item, Dropped) else without_dropped(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return type(value)(item for item in value if not isinstance(item, Dropped))
    if isinstance(value, Dropped):
        return None
    return value
