"""The `sdray` console script: as a user runs it (a real subprocess), and its subcommands in-process."""

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipelines.cli import COMMANDS, main


def sdray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_top_level_help_lists_every_command():
    result = sdray("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "data"] + ["data synth"])
def test_every_subcommand_has_help(command, capsys):
    # In-process: the same `main(argv)` the console script calls, without a Python start per command.
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert f"usage: sdray {command}" in capsys.readouterr().out


def test_unknown_command_exits_2():
    result = sdray("trian")
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr


def test_synth_writes_readable_parquet(tmp_path):
    result = sdray("data", "synth", "--out", str(tmp_path / "d"), "--num-images", "64", "--resolution", "64")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(tmp_path / "d").num_rows == 64


def test_bad_config_key_is_one_line_and_exit_2(tmp_path):
    result = sdray("data", "synth", "--out", str(tmp_path / "d"), "--set", "synth.num_imgs=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "'synth.num_imgs'" in result.stderr
    assert not (tmp_path / "d").exists()


def test_missing_config_file_exits_2(tmp_path):
    result = sdray("data", "synth", "--out", str(tmp_path / "d"), "--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
