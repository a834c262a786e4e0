"""Every registered cache head and raw-frame method, through the one surface of its family.

Parametrised over `list_heads()` and `list_methods()` (a new head or method is checked here the
moment it registers): forward shape, the save/load round trip of its state dict, the count of what
it trains (printed; run with -s to see them), set_classnames, and the type and range check of
every option its config has.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

from clipreel.errors import ClipreelError
from clipreel.heads.clip import TextModel, load_clip
from clipreel.heads.layers import trainable_parameter_count, trainable_parameters
from clipreel.heads.registry import (
    create_head,
    create_method,
    head_entry,
    list_heads,
    list_methods,
    method_entry,
    rebuild_head,
    rebuild_method,
)
from clipreel.stores.features import StoreLayout

CLASSNAMES = ["red circle moving left", "red circle moving right", "blue square growing"]
FRAMES = 3
SIZE = 112  # clipreel-tiny's image size
# A store of clipreel-tiny features: 3 frames, 2 feature blocks, CLS + 7 x 7 patches, width 64.
LAYOUT = StoreLayout(videos=4, views=1, frames=FRAMES, layers=2, tokens=50, width=64, embed_dim=64)
PROVENANCE = {"num_heads": 2}


@pytest.fixture(scope="module")
def text_model(tiny_clip):
    model, tokenizer = tiny_clip
    return TextModel(clip=model, tokenizer=tokenizer, model_name="clipreel-tiny")


def store_batch(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """Random features of what the head reads, as the cache loader hands them over (fp16)."""
    entry = head_entry(name)
    blocks = LAYOUT.layers if entry.blocks == "all" else 1
    patches = LAYOUT.tokens - 1
    shapes = {
        "embeds": (batch, FRAMES, LAYOUT.embed_dim),
        "tokens": (batch, FRAMES, blocks, LAYOUT.tokens, LAYOUT.width),
        "attention": (batch, 2, FRAMES - 1, blocks, patches, patches),
    }
    generator = torch.Generator().manual_seed(3)
    return {field: torch.rand(shapes[field], generator=generator).half() for field in entry.reads}


def randomised(module: torch.nn.Module) -> None:
    """Move every trainable value away from its initialisation (some start at zero)."""
    with torch.no_grad():
        for param in trainable_parameters(module).values():
            param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize("name", list_heads())
def test_every_cache_head_has_the_surface_of_its_family(name, text_model, tmp_path):
    entry = head_entry(name)
    torch.manual_seed(0)
    head, config = create_head(name, store_layout=LAYOUT, provenance=PROVENANCE, classnames=CLASSNAMES,
                               text_model=text_model)
    trainable = trainable_parameter_count(head)
    print(f"{name}: {trainable:,} trainable parameters")
    assert trainable == sum(param.numel() for param in head.parameters() if param.requires_grad)
    assert (trainable > 0) == entry.trains

    randomised(head)
    batch = store_batch(name)
    head.eval()
    with torch.no_grad():
        logits = head(batch)
    assert logits.shape == (2, len(CLASSNAMES)) and torch.isfinite(logits).all()

    # The state dict holds what the head learned (never the frozen CLIP) and rebuilds it exactly.
    state = head.state_dict()
    assert not [key for key in state if key.startswith("clip.") or ".clip." in key]
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "head.safetensors")
    torch.manual_seed(1)  # another initialisation, replaced by the load
    rebuilt = rebuild_head(name, config, CLASSNAMES, text_model)
    rebuilt.load_state_dict(load_file(tmp_path / "head.safetensors"))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(batch), logits)

    # Text heads classify any class list; closed-set heads only the classes they were made for.
    if entry.scores_text:
        rebuilt.set_classnames(CLASSNAMES[:2])
        with torch.no_grad():
            assert rebuilt(batch).shape == (2, 2)
    else:
        with pytest.raises(ClipreelError, match="cannot classify 2"):
            rebuilt.set_classnames(CLASSNAMES[:2])


@pytest.mark.parametrize("name", list_methods())
def test_every_raw_frame_method_has_the_surface_of_its_family(name, tiny_clip, tmp_path):
    clip_model, tokenizer = tiny_clip
    torch.manual_seed(0)
    model, config = create_method(name, copy.deepcopy(clip_model), tokenizer, CLASSNAMES, FRAMES, {})
    trainable = trainable_parameters(model)
    print(f"{name}: {trainable_parameter_count(model):,} trainable parameters")
    assert trainable
    groups = model.parameter_groups(1e-3, 0.01)
    grouped = [id(param) for group in groups for param in group["params"]]
    assert sorted(grouped) == sorted(id(param) for param in trainable.values())  # each trainable once

    frames = torch.randn(2, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    model.train()
    outputs = model(frames)
    assert set(outputs) == {"logits", "frame_embeds", "video_embeds"}
    embed_dim = clip_model.text_projection.shape[1]
    assert outputs["logits"].shape == (2, len(CLASSNAMES))
    assert outputs["frame_embeds"].shape == (2, FRAMES, embed_dim)
    assert outputs["video_embeds"].shape == (2, embed_dim)
    loss = model.loss(outputs, torch.tensor([0, 2]), label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss) and any(param.grad is not None for param in trainable.values())

    # The state dict rebuilds the model exactly around a fresh copy of the same CLIP.
    randomised(model)
    model.eval()
    with torch.no_grad():
        logits = model(frames)["logits"]
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    fresh_clip, _ = load_clip("clipreel-tiny", "none")
    torch.manual_seed(1)
    rebuilt = rebuild_method(name, fresh_clip, tokenizer, CLASSNAMES, config)
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(frames)["logits"], logits)
        rebuilt.set_classnames(CLASSNAMES[:2])
        assert rebuilt(frames)["logits"].shape == (2, 2)


@pytest.mark.parametrize("name", list_methods())
def test_method_options_are_checked_before_anything_is_built(name, tiny_clip):
    clip_model, tokenizer = tiny_clip
    with pytest.raises(ClipreelError, match=f"unknown options for method {name}"):
        create_method(name, clip_model, tokenizer, CLASSNAMES, FRAMES, {"no_such_option": 1})
    with pytest.raises(ClipreelError, match="--frames"):
        create_method(name, clip_model, tokenizer, CLASSNAMES, FRAMES, {"frames": 8})
    assert method_entry(name).recipe.norm in ("clip", "imagenet")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ClipreelError, match="choose one of evl, mit"):
        head_entry("nosuch")
    with pytest.raises(ClipreelError, match="choose one of vifi, prompt"):
        method_entry("evl")
    with pytest.raises(ClipreelError, match="fixed by the store"):
        create_head("linear", store_layout=LAYOUT, provenance=PROVENANCE, classnames=CLASSNAMES,
                    options={"embed_dim": 32})


def test_the_cli_help_lists_what_the_registries_hold():
    from typer.testing import CliRunner

    from clipreel.cli import app

    runner = CliRunner()
    for command, names in (("train", list_heads()), ("finetune", list_methods()),
                           ("fewshot", list_heads() + list_methods())):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        shown = re.sub(r"[\s│]+", "", result.output)  # the help's text, without its wrapping and box
        for name in names:
            summary = head_entry(name).summary if name in list_heads() else method_entry(name).summary
            assert re.sub(r"\s+", "", f"{name} ({summary})") in shown, (command, name)


def _outside(allowed) -> float:
    """A number just outside a declared range."""
    if allowed.low is not None:
        return allowed.low if allowed.low_open else allowed.low - 1
    return allowed.high if allowed.high_open else allowed.high + 1


@pytest.mark.parametrize("family, name", [("head", name) for name in list_heads()]
                         + [("method", name) for name in list_methods()])
def test_every_option_is_checked_against_its_type_and_range(family, name):
    config_class = (head_entry if family == "head" else method_entry)(name).config_class
    types = typing.get_type_hints(config_class)
    what = f"{family} {name}"
    for field in dataclasses.fields(config_class):
        kind = types[field.name]
        plain = {int | None: int, float | None: float, str | None: str, dict[str, str]: dict}.get(kind, kind)
        wrong = {bool: ["maybe", 1], int: [2.5, True, "two"], float: ["x", float("inf"), float("nan"), False],
                 str: [1, True], dict: ["x", 1, ["a"]]}[plain]
        for value in wrong:
            with pytest.raises(ClipreelError, match=f"--option {field.name}=.*: the {field.name} of {what} must be"):
                config_class.checked_options({field.name: value}, what)
        allowed = field.metadata.get("range")
        if allowed is not None:
            with pytest.raises(ClipreelError, match=re.escape(str(allowed))):
                config_class.checked_options({field.name: _outside(allowed)}, what)
        if field.default is not dataclasses.MISSING:
            assert config_class.checked_options({field.name: field.default}, what) == {field.name: field.default}
    takes_one = [field.name for field in dataclasses.fields(config_class)
                 if types[field.name] is float and 1 in field.metadata.get("range", [1])]
    for number in takes_one:  # a whole number is a number
        checked = config_class.checked_options({number: 1}, what)[number]
        assert checked == 1.0 and isinstance(checked, float)
