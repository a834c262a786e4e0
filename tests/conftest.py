"""Shared fixtures: one local Ray for the whole session, torch on one thread."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray shared by every test that needs one (start-up dominates small jobs)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_clip():
    """The tiny open_clip model (both towers, seeded random init, frozen, eval) and its tokenizer."""
    import open_clip

    from clipreel.pipeline.backbone import load_clip

    model, _ = load_clip("clipreel-tiny", "none")
    return model, open_clip.get_tokenizer("clipreel-tiny")
