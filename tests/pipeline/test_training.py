"""The training kit both trainers share: the no-decay rule on a method's parameter groups, the
warmup-cosine schedule, and the one resume rule (what may change, what must match, every
difference named)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from clipreel.errors import ClipreelError
from clipreel.heads.layers import one_parameter_group, trainable_parameters
from clipreel.heads.registry import create_method, method_entry
from clipreel.pipeline.training.checkpoint import (
    MAY_CHANGE_ON_RESUME,
    checkpoint_to_resume,
    run_identity,
    save_checkpoint,
)
from clipreel.pipeline.training.optim import (
    adamw_with_schedule,
    exempt_from_weight_decay,
    optimizer_groups,
    recipe_dict,
    resolved_recipe,
    warmup_cosine,
)
from clipreel.stores.runs import CONFIG_FILE


def test_the_no_decay_rule_splits_each_group_of_a_method_that_asks_for_it(tiny_clip):
    clip_model, tokenizer = tiny_clip
    torch.manual_seed(0)
    xclip, _ = create_method("xclip", copy.deepcopy(clip_model), tokenizer, ["a", "b"], 3, {})
    recipe = method_entry("xclip").recipe
    assert not recipe.decay_everything  # X-CLIP's reference exempts 1-D parameters, biases, positions
    groups = optimizer_groups(xclip, xclip.parameter_groups(1e-3, 0.001), recipe.decay_everything)
    assert [group["name"] for group in groups] == ["clip", "clip_no_decay", "new", "new_no_decay"]
    names = {id(param): name for name, param in xclip.named_parameters()}
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 if group["name"].startswith("clip") else 1e-2)
        for param in group["params"]:
            name = names[id(param)]
            exempt = param.dim() <= 1 or name.endswith(".bias") or "positional_embedding" in name
            assert exempt == exempt_from_weight_decay(name, param)
            assert group["weight_decay"] == (0.0 if exempt else 0.001), name
    grouped = sorted(id(param) for group in groups for param in group["params"])
    assert grouped == sorted(id(param) for param in trainable_parameters(xclip).values())

    # A recipe that decays everything keeps the model's own groups.
    vifi_groups = one_parameter_group(xclip, 1e-3, 0.001)
    assert optimizer_groups(xclip, vifi_groups, decay_everything=True) == vifi_groups


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5)  # half-way through the cosine
    assert factor(12) == pytest.approx(0.0) and factor(20) == pytest.approx(0.0)
    no_warmup = warmup_cosine(0, 10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5)


def _identity(**changes) -> dict:
    settings = {"kind": "linear", "store": "s.zarr", "out": "run", "epochs": 2, "seed": 0, "lr": None, "device": "cpu",
                "workers": 1, "val_split": "val", **changes}
    recipe = resolved_recipe(method_entry("vifi").recipe, lr=settings["lr"], weight_decay=None, warmup_epochs=None)
    return run_identity(settings, recipe_dict(recipe), classnames=["a", "b"], store_provenance={"model": "m"})


def _saved_run(run_dir, identity, epochs: int = 2) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = adamw_with_schedule([{"params": list(model.parameters()), "lr": 0.1}],
                                               method_entry("vifi").recipe, 4, 10, None)
    save_checkpoint(run_dir, identity, model, optimizer, scheduler, epochs, [])


def test_the_resume_rule_names_every_difference(tmp_path):
    run_dir = tmp_path / "run"
    identity = _identity()
    _saved_run(run_dir, identity)
    assert "epochs" not in identity and "device" not in identity and "lr" not in identity  # compared resolved
    assert {"epochs", "device", "workers", "val_split"} <= set(MAY_CHANGE_ON_RESUME)

    # More epochs, another device, other workers, no validation: the same run, continued.
    resumed = checkpoint_to_resume(run_dir, _identity(epochs=5, device="cuda", workers=2, val_split=None), 5, "train")
    assert resumed["epoch"] == 2

    # A setting, the resolved recipe and what the store's features mean must match; each is named.
    other = _identity(seed=3, lr=1e-3)
    other["store_provenance"] = {"model": "another"}
    with pytest.raises(ClipreelError, match="cannot be resumed") as refused:
        checkpoint_to_resume(run_dir, other, 5, "train")
    message = str(refused.value)
    for line in ("seed: the run has 0, this command 3", "recipe.lr: the run has 8e-06, this command 0.001",
                 "store_provenance.model: the run has 'm', this command 'another'"):
        assert line in message
    with pytest.raises(ClipreelError, match="already trained 2 epochs, more than the 1"):
        checkpoint_to_resume(run_dir, identity, 1, "train")


def test_run_directories_that_are_not_resumable_runs(tmp_path):
    assert checkpoint_to_resume(tmp_path / "new", _identity(), 2, "finetune") is None
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ClipreelError, match="no checkpoint.pt of an earlier `clipreel finetune`"):
        checkpoint_to_resume(stranger, _identity(), 2, "finetune")
    # A run with nothing to train keeps no checkpoint: its finished directory is made again.
    finished = tmp_path / "zeroshot"
    finished.mkdir()
    (finished / CONFIG_FILE).write_text(json.dumps({"kind": "zeroshot"}))
    assert checkpoint_to_resume(finished, _identity(), 2, "train", trains=False) is None
