"""Reading checkpoint files without running code in them: real files written by torch.save and
pickle in tmp_path, some holding objects whose unpickling would run code or import modules."""

from __future__ import annotations

import sys
import textwrap
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from clipreel.errors import ClipreelError
from clipreel.heads.checkpoints import read_checkpoint, read_state_dict


class OpensFileOnLoad:
    """Unpickling this calls open(path, "w"): a stand-in for any code a pickle can make run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tensors_of_every_layout() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=generator)
    return {
        "float32": base,
        "transposed": base.T,  # non-contiguous strides
        "slice": base[1:3, 2:],  # an offset into a storage shared with "float32"
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "int64": torch.arange(10),
        "bool": base > 0,
        "uint16": torch.arange(5).to(torch.uint16),  # a dtype pickled by _rebuild_tensor_v3
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def yacs_like_module(tmp_path):
    """A module `yacs_like` defining a dict-like config class, importable only while this lasts."""
    source = tmp_path / "yacs_like.py"
    source.write_text(textwrap.dedent('''
        class CfgNode(dict):
            """Like yacs.config.CfgNode: a dict subclass with attributes of its own."""
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.__dict__["frozen"] = True
    '''))
    sys.path.insert(0, str(tmp_path))
    import yacs_like

    return yacs_like


def forget_module(tmp_path, name: str) -> None:
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name)
    (tmp_path / f"{name}.py").unlink()


def test_training_checkpoint_with_foreign_objects_gives_its_tensors_and_runs_nothing(tmp_path):
    weights = tensors_of_every_layout()
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    marker = tmp_path / "code-ran"
    yacs_like = yacs_like_module(tmp_path)
    config = yacs_like.CfgNode(MODEL={"ARCH": "ViT-B/16"}, TRAIN={"EPOCHS": 30})
    path = tmp_path / "ckpt_epoch_29.pth"
    torch.save(
        {
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "epoch": 29,
            "max_accuracy": 81.5,
            "config": config,  # X-CLIP and ViFi-CLIP save their yacs config like this
            "hook": OpensFileOnLoad(marker),
            "history": [1.0, OpensFileOnLoad(marker), "kept"],
        },
        path,
    )
    forget_module(tmp_path, "yacs_like")

    contents = read_checkpoint(path, drop_foreign=True)

    assert not marker.exists()
    assert "yacs_like" not in sys.modules  # nothing was imported
    assert set(contents) == {"model", "optimizer", "epoch", "max_accuracy", "history"}
    assert contents["epoch"] == 29 and contents["max_accuracy"] == 81.5
    assert contents["history"] == [1.0, None, "kept"]  # a list keeps its positions
    for key, value in weights.items():
        assert contents["model"][key].dtype == value.dtype, key
        assert torch.equal(contents["model"][key], value), key
    saved_state = optimizer.state_dict()
    assert contents["optimizer"]["param_groups"] == saved_state["param_groups"]
    for index, state in saved_state["state"].items():
        for name, value in state.items():
            assert torch.equal(contents["optimizer"]["state"][index][name], value), name


def test_foreign_objects_are_refused_by_default_naming_their_class(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": OpensFileOnLoad(marker)}, path)
    with pytest.raises(ClipreelError, match="refers to io.open") as error:
        read_checkpoint(path)
    assert "can run code" in str(error.value)
    assert not marker.exists()
    # Model weights are read with the foreign object dropped.
    assert list(read_state_dict(path)) == ["w"]
    assert not marker.exists()
    # The file really runs code when unpickled the ordinary way.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_plain_state_dicts_read_exactly(tmp_path, legacy):
    weights = tensors_of_every_layout()
    if legacy:
        weights.pop("uint16")  # torch's own reader of the legacy format fails on it
    path = tmp_path / "weights.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=not legacy)
    for drop_foreign in (False, True):
        contents = read_checkpoint(path, drop_foreign=drop_foreign)
        assert list(contents) == list(weights)
        for key, value in weights.items():
            assert contents[key].dtype == value.dtype and torch.equal(contents[key], value), key


def test_state_dict_unwrapping_and_safetensors(tmp_path):
    weights = {"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(2)}
    wrapped = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in weights.items()}}, wrapped)
    plain = tmp_path / "weights.safetensors"
    save_file(weights, plain)
    for path in (wrapped, plain):
        read = read_state_dict(path)
        assert read.keys() == weights.keys()
        assert all(torch.equal(read[key], value) for key, value in weights.items())


def test_files_that_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other_zip = tmp_path / "photos.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("photo.jpg", b"\xff\xd8")
    for path in (junk, other_zip):
        with pytest.raises(ClipreelError, match="cannot read it as a checkpoint"):
            read_checkpoint(path)
    numbers = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], numbers)
    with pytest.raises(ClipreelError, match="holds no state dict"):
        read_state_dict(numbers)
