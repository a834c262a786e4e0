"""The Ray a stage runs on: a cluster at `--address`, this process's Ray, or a local one started here."""

from __future__ import annotations

import logging
import os


def ensure_ray(address: str | None = None) -> bool:
    """Join `address`, or reuse this process's Ray, or start a local one. True if this call started it
    (the caller then shuts it down when its stage ends)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own INFO/WARNING chatter (start-up notices, per-dataset summaries) would bury the
    # progress bar and the summary; its errors still come through.
    logging.getLogger("ray").setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}},
    )
    return True


def quiet_ray_data(context) -> None:
    """No progress bars or per-dataset INFO lines from Ray Data (a `DataContext`): they would bury
    clipreel's own progress bar and summary. Its errors still come through."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False
