"""README.md and docs/train.md run as written, in order, in a fresh directory (runner: tests/docs_runner.py)."""

from __future__ import annotations

import pytest
from docs_runner import run_chain

pytestmark = pytest.mark.slow


def test_the_readme_and_the_training_guide_run_as_written(
    ray_session, tiny_model_dir, tmp_path, sdray_forkserver
):
    run_chain(
        "quickstart",
        ray_session.get_runtime_context().gcs_address,
        tiny_model_dir,
        tmp_path,
        sdray_forkserver,
    )
