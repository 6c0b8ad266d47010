"""README.md and docs/*.md run as written (rules: tests/docs_commands.py; runner: tests/docs_runner.py).

This module checks the rules and runs the preprocessing guide; test_docs_quickstart.py and
test_docs_finetune.py run the other chains.
"""

from __future__ import annotations

import subprocess

import pytest
from cli_forkserver import client_command
from docs_commands import (
    CHAINS,
    DOC_ORDER,
    PREREQUISITES,
    DocsError,
    all_commands,
    chain_commands,
    commands_of,
    why_not_run,
)
from docs_runner import run_chain


def test_extractor_rules(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```bash\nsdray a --x 1   # comment\nsdray b \\\n    --y 'two words'\n```\n"
        "<!-- docs-test: skip shown, not run -->\n```bash\nsdray c\n```\n"
        "```yaml\nkey: sdray d\n```\n"
        "<!-- docs-test: print-config done elsewhere -->\n```bash\necho a > f\nX=1 sdray e --y 2\n```\n"
    )
    assert [c.runnable for c in commands_of(doc, "x.md")] == [
        "sdray a --x 1",
        "sdray b --y 'two words'",
        "echo a > f",
        "X=1 sdray e --y 2 --print-config",
    ]
    assert [c.where for c in commands_of(doc, "x.md")] == ["x.md:2", "x.md:3", "x.md:15", "x.md:16"]
    doc.write_text("```\nsdray train --data d\n```\n")
    with pytest.raises(DocsError, match="x.md:2: a sdray command in a ```"):
        commands_of(doc, "x.md")
    for mark in ("skip", "print-config"):
        doc.write_text(f"<!-- docs-test: {mark} -->\n```bash\nsdray c\n```\n")
        with pytest.raises(DocsError, match=f"{mark} needs a reason"):
            commands_of(doc, "x.md")
    assert why_not_run("SDRAY_API_KEY=s ray job submit -- x") and why_not_run("sdray train --config sd15")
    assert why_not_run("sdray train --data data/latents") is None


def test_chains_split_the_docs_in_reading_order():
    assert sorted(name for names in CHAINS.values() for name in names) == sorted(DOC_ORDER)
    assert all(list(names) == sorted(names, key=DOC_ORDER.index) for names in CHAINS.values())
    assert set(PREREQUISITES) <= set(CHAINS)
    assert sum(len(chain_commands(chain)) for chain in CHAINS) == len(all_commands())


def test_the_preprocessing_guide_runs_as_written(ray_session, tiny_model_dir, tmp_path, sdray_forkserver):
    run_chain(
        "preprocess",
        ray_session.get_runtime_context().gcs_address,
        tiny_model_dir,
        tmp_path,
        sdray_forkserver,
    )


def test_a_forked_command_keeps_its_own_cwd_streams_and_exit_code(sdray_forkserver, tmp_path):
    """The docs chains' `sdray` (tests/cli_forkserver.py) ends as the console script would."""
    client = client_command(sdray_forkserver)
    bad = subprocess.run(
        [*client, "train", "--data", "nowhere", "--out", "run"], cwd=tmp_path, capture_output=True
    )
    assert (bad.returncode, bad.stdout) == (2, b""), bad.stderr
    assert bad.stderr.decode() == (
        f"error: latent cache {tmp_path / 'nowhere'} does not exist; write one with `sdray preprocess`\n"
    )
    shown = subprocess.run(
        [*client, "train", "--data", "d", "--out", "o", "--set", "train.learning_rate=0.5", "--print-config"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "learning_rate: 0.5" in shown.stdout and not (tmp_path / "o").exists()
