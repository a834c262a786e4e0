"""Reading checkpoint files into tensors and plain containers, without running code they carry.

Every checkpoint clipreel opens goes through here:

- `.safetensors`: tensors only, by design of the format.
- `torch.save` files: `torch.load(weights_only=True)`, which rebuilds tensors and plain
  containers and refuses every other class. With `drop_foreign=True` (training checkpoints that
  keep other objects next to the weights: X-CLIP's and ViFi-CLIP's yacs `CfgNode` under
  "config", an optimizer's state) objects of other classes are dropped instead, unread: see
  `checkpoint_pickle` (nothing is imported, nothing called).
- TorchScript archives (`torch.jit.save`). `torch.jit.load` runs code from the archive while it
  loads (a TorchScript class's `__setstate__`), so it is used only when the caller trusts the
  file (`trust_code=True`, the CLI's `--trust-checkpoint-code`). OpenAI's CLIP releases are
  TorchScript archives too, and are read without it: their module tree is unpickled into plain
  records (`checkpoint_pickle.ScriptObject`), and which attributes are parameters and buffers is
  read from the `__parameters__`/`__buffers__` lines of the class declarations in the archive's
  `code/` folder, as TorchScript's own importer does (torch/csrc/jit/serialization/
  import_source.cpp, `importClass`). The result has the names and order of
  `torch.jit.load(path).state_dict()`.

May import: torch, safetensors, clipreel.errors, clipreel.heads.checkpoint_pickle.
"""

from __future__ import annotations

import ast
import pickle
import re
import warnings
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from clipreel.errors import ClipreelError
from clipreel.heads.checkpoint_pickle import ScriptObject, TorchArchive, UnknownGlobal, dropped_names, without_dropped

# OpenAI's CLIP archives keep these buffers at the top of the module tree (next to visual.*,
# transformer.*, token_embedding.*): the mark of their layout.
OPENAI_ARCHIVE_BUFFERS = ("input_resolution", "context_length", "vocab_size")
TRUST_HINT = (
    "If you trust whoever made the file, pass --trust-checkpoint-code; otherwise ask for its weights "
    "as a state dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
)
FORMATS_HINT = (
    "Expected a state dict saved with torch.save, a .safetensors file, or an OpenAI CLIP TorchScript archive"
)
_CLASS_LINE = re.compile(r"^class (\w+)(?:\((\w+)\))?:")
# How torch.load(weights_only=True) names the class it refused.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_checkpoint(path: str | Path, *, trust_code: bool = False, drop_foreign: bool | Collection[str] = False):
    """Whatever a checkpoint file holds, as tensors (on the CPU) inside plain containers.

    `drop_foreign`: objects of classes other than tensors and plain containers are dropped (a
    dict entry holding one is left out, a list item becomes None) instead of refusing the file
    (a collection of qualified class names: objects of those classes only, any other is refused);
    this reads zip archives (torch.save since PyTorch 1.6), while a file in torch's older format
    must hold tensors and plain containers only.
    TorchScript archives give their state dict (see the module docstring for `trust_code`).
    Raises ClipreelError for a file it cannot or may not read.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zip_file:
                archive = TorchArchive(zip_file)
                if archive.is_torchscript:
                    return _torchscript_state_dict(path, archive, trust_code)
                if drop_foreign:
                    contents = archive.load(drop_unknown=True)
                    if drop_foreign is not True:
                        _refuse_foreign(path, dropped_names(contents) - set(drop_foreign), drop_foreign)
                    return without_dropped(contents)
        return torch.load(path, map_location="cpu", weights_only=True)
    except ClipreelError:
        raise
    except pickle.UnpicklingError as exc:
        foreign = _UNSUPPORTED_GLOBAL.search(str(exc))
        if foreign:
            raise ClipreelError(
                f"{path}: its pickle refers to {foreign.group(1)}, which is neither a tensor nor a plain "
                "container; clipreel unpickles nothing else, because unpickling it can run code. Save the "
                "weights as a state dict (torch.save(model.state_dict(), ...)) or a .safetensors file."
            ) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # a damaged or foreign file: torch and zipfile raise many kinds
        raise _unreadable(path, exc) from exc


def read_state_dict(path: str | Path, *, trust_code: bool = False) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: {name: tensor}.

    Training checkpoints that wrap them as {"state_dict": ...} and DDP "module." prefixes are
    unwrapped; other objects stored next to the weights are dropped unread.
    """
    path = Path(path)
    contents = read_checkpoint(path, trust_code=trust_code, drop_foreign=True)
    if isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict):
        contents = contents["state_dict"]
    tensors = isinstance(contents, dict) and all(isinstance(value, torch.Tensor) for value in contents.values())
    if not contents or not tensors:
        raise ClipreelError(
            f"{path}: holds no state dict (a mapping of names to tensors; got {_describe(contents)}). {FORMATS_HINT}."
        )
    if all(key.startswith("module.") for key in contents):
        contents = {key[len("module.") :]: value for key, value in contents.items()}
    return dict(contents)


# --------------------------------------------------------------------------- TorchScript archives


class _NotOpenAI(Exception):
    """Why a TorchScript archive cannot be read as an OpenAI CLIP archive."""


@dataclass
class _ScriptClass:
    """What a class declaration in an archive's code/ folder says about its attributes."""

    is_module: bool
    parameters: frozenset[str] = frozenset()
    buffers: frozenset[str] = frozenset()
    sets_state: bool = False  # defines __setstate__, which torch.jit.load would run


def _torchscript_state_dict(path: Path, archive: TorchArchive, trust_code: bool) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP archive's state dict, read without its code; other archives need trust_code."""
    try:
        return _openai_state_dict(archive)
    except _NotOpenAI as reason:
        if not trust_code:
            raise ClipreelError(
                f"{path} is a TorchScript archive but not an OpenAI CLIP archive ({reason}). Loading it "
                f"would run code stored in it (TorchScript classes run their __setstate__ at load). {TRUST_HINT}."
            ) from None
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the only reader
        warnings.simplefilter("ignore", FutureWarning)
        return dict(torch.jit.load(path, map_location="cpu").state_dict())


def _openai_state_dict(archive: TorchArchive) -> dict[str, torch.Tensor]:
    classes = _script_classes(archive)
    setters = sorted(name for name, declared in classes.items() if declared.sets_state)
    if setters:
        raise _NotOpenAI(f"its class {setters[0]} defines __setstate__")
    try:
        root = archive.load(script_objects=True)
    except UnknownGlobal as exc:
        raise _NotOpenAI(f"its data.pkl refers to {exc}") from None
    state_dict = dict(_named_tensors(root, "", classes))
    missing = [name for name in OPENAI_ARCHIVE_BUFFERS if name not in state_dict]
    if missing or not any(name.startswith("visual.") for name in state_dict):
        raise _NotOpenAI(
            f"it lacks OpenAI CLIP's layout: {', '.join(OPENAI_ARCHIVE_BUFFERS)} buffers and visual.* weights"
        )
    return state_dict


def _named_tensors(record, prefix: str, classes: dict[str, _ScriptClass]):
    """(name, tensor) of a module record's parameters, then its buffers, then its submodules',
    in attribute order: the order of torch.nn.Module.state_dict."""
    if not isinstance(record, ScriptObject) or not isinstance(record.state, dict):
        raise _NotOpenAI(f"{prefix or 'its root'} is not a module with plain attributes")
    declared = classes.get(record.qualified_name)
    if declared is None or not declared.is_module:
        raise _NotOpenAI(f"the code/ folder declares no module class {record.qualified_name}")
    for names in (declared.parameters, declared.buffers):
        for name, value in record.state.items():
            if name in names and isinstance(value, torch.Tensor):
                yield prefix + name, value
    for name, value in record.state.items():
        if isinstance(value, ScriptObject) and getattr(classes.get(value.qualified_name), "is_module", False):
            yield from _named_tensors(value, f"{prefix}{name}.", classes)


def _script_classes(archive: TorchArchive) -> dict[str, _ScriptClass]:
    """Every class declared in the archive's code/ folder, by qualified name.

    The file code/__torch__/a/b.py holds the classes __torch__.a.b.<Name>. Each declaration opens
    with `class Name(Module):` at the start of a line; its body lines are indented and include
    `__parameters__ = ["weight", ...]` and `__buffers__ = [...]`.
    """
    code = archive.prefix + "code/"
    classes: dict[str, _ScriptClass] = {}
    for record in sorted(archive.names):
        if not (record.startswith(code) and record.endswith(".py")):
            continue
        qualifier = record[len(code) : -len(".py")].replace("/", ".")
        current = None
        for line in archive.zip.read(record).decode("utf-8", errors="replace").splitlines():
            header = _CLASS_LINE.match(line)
            if header:
                current = _ScriptClass(is_module=header.group(2) == "Module")
                classes[f"{qualifier}.{header.group(1)}"] = current
                continue
            if line[:1] not in (" ", "\t"):
                current = None  # a top-level function or blank line ends the class body
            if current is None:
                continue
            statement = line.strip()
            for attribute in ("__parameters__", "__buffers__"):
                if statement.startswith(f"{attribute} = "):
                    names = frozenset(ast.literal_eval(statement.partition("=")[2].strip()))
                    setattr(current, attribute.strip("_"), names)
            if statement.startswith("def __setstate__("):
                current.sets_state = True
    return classes


# --------------------------------------------------------------------------- messages


def _refuse_foreign(path: Path, foreign: set[str], droppable: Collection[str]) -> None:
    """Refuse a file whose pickle names classes other than the ones that may be skipped."""
    if foreign:
        raise ClipreelError(
            f"{path}: its pickle refers to {', '.join(sorted(foreign))}, which is neither a tensor nor a plain "
            f"container (only {', '.join(droppable)} is skipped, unread); clipreel unpickles nothing else, because "
            "unpickling it can run code. Save the weights as a state dict (torch.save(model.state_dict(), ...)) "
            "or a .safetensors file."
        )


def _unreadable(path: Path, exc: BaseException) -> ClipreelError:
    return ClipreelError(f"{path}: cannot read it as a checkpoint ({type(exc).__name__}: {_first_line(exc)}). {FORMATS_HINT}.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(value) -> str:
    """A short description of what a checkpoint held, for messages."""
    if isinstance(value, dict):
        kinds = sorted({type(item).__name__ for item in value.values()})
        return f"a dict of {len(value)} entries ({', '.join(kinds) or 'empty'})"
    return type(value).__name__
