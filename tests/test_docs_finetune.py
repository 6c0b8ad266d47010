"""docs/finetune.md and docs/serve.md run as written, in order, from the base model they start from
(runner: tests/docs_runner.py)."""

from __future__ import annotations

import pytest
from docs_runner import run_chain

pytestmark = pytest.mark.slow


def test_the_finetuning_and_serving_guides_run_as_written(
    ray_session, tiny_model_dir, tmp_path, sdray_forkserver
):
    run_chain(
        "finetune-serve",
        ray_session.get_runtime_context().gcs_address,
        tiny_model_dir,
        tmp_path,
        sdray_forkserver,
    )
