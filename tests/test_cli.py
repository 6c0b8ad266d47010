"""The `sdray` console script: as a user runs it (a real subprocess), and its subcommands in-process."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

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
    out = capsys.readouterr().out
    assert f"usage: sdray {command}" in out
    # Every command that resolves a pipeline config can print it (export and evaluate resolve none).
    assert ("--print-config" in out) == (command not in ("export", "evaluate"))


PRINT_CONFIG = """
import sys, yaml
from pipelines.cli import main
code = main(sys.argv[1:])
print(yaml.safe_dump({"code": code, "loaded": sorted(m for m in ("torch", "diffusers", "ray") if m in sys.modules)}))
"""


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["train", "--data", "d", "--out", "o", "--steps", "7", "--set", "train.lora.enabled=true"],
         {("train", "max_steps"): 7, ("train", "data"): "d", ("train", "output"): "o"}),
        (["dreambooth", "--instance", "i", "--instance-prompt", "a sks dog", "--num-class-images", "3", "--out", "o"],
         {("dreambooth", "instance_prompt"): "a sks dog", ("dreambooth", "num_class_images"): 3}),
        (["serve", "--port", "9000"], {("serve", "port"): 9000}),
    ],
)  # fmt: skip
def test_print_config_prints_the_resolved_config_and_runs_nothing(argv, expect, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", PRINT_CONFIG, *argv, "--print-config"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed, _, status = result.stdout.rpartition("code: ")
    cfg = yaml.safe_load(printed)
    for (section, key), value in expect.items():
        assert cfg[section][key] == value
    # Nothing ran: no output written, and none of the stage libraries was even imported.
    assert yaml.safe_load("code: " + status) == {"code": 0, "loaded": []}
    assert list(tmp_path.iterdir()) == []


def test_print_config_still_refuses_a_bad_value(tmp_path):
    result = sdray("train", "--data", "d", "--set", "train.batch_size=0", "--print-config")
    assert result.returncode == 2 and "batch_size" in result.stderr and "model:" not in result.stdout


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


def test_a_failing_command_shows_one_error_line_and_keeps_ray_in_a_log(
    ray_session, tiny_components, tmp_path
):
    # Ray starts (here: joins the session's cluster) only after the cache checks passed; everything Ray says
    # goes to the log file; the terminal gets where the log is, then one error line.
    from cache_fixtures import write_test_cache

    cache = write_test_cache(tmp_path / "cache", tiny_components, num_rows=8, rows_per_shard=8)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    env["SDRAY_LOG_DIR"] = str(tmp_path / "logs")
    args = ["train", "--data", str(cache), "--out", str(tmp_path / "run"), "--set", "train.batch_size=64"]
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if " sdray." not in line]  # sdray's own log lines
    (log,) = (tmp_path / "logs").iterdir()
    assert lines == [f"details: {log} (-v shows it on the terminal)", lines[-1]], result.stderr
    assert lines[-1].startswith("error: ") and "8 rows, but one step needs" in lines[-1]
    assert "Ray cluster" in log.read_text()  # Ray's own "Connecting to existing Ray cluster" line


# Runs a command in a fresh interpreter and prints which of the heavy libraries it imported before exiting.
_REPORT_IMPORTS = (
    "import sys; from pipelines.cli import main; code = main(sys.argv[1:]); "
    "print('imported:', sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)); sys.exit(code)"
)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "{tmp}/nope", "--out", "{tmp}/run"],
        ["preprocess", "--input", "{tmp}/nope", "--output", "{tmp}/cache"],
    ],
    ids=["train", "preprocess"],
)
def test_a_typo_in_a_path_fails_before_ray_starts_or_the_models_load(tmp_path, args):
    env = {**os.environ, "SDRAY_LOG_DIR": str(tmp_path / "logs")}
    env.pop("RAY_ADDRESS", None)
    argv = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run(
        [sys.executable, "-c", _REPORT_IMPORTS, *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {_missing(args[0], tmp_path)}"
    assert result.stdout.strip().splitlines()[-1] == "imported: []"  # seconds of imports saved on a typo
    assert not list((tmp_path / "logs").iterdir())  # Ray said nothing: it never started


def _missing(command: str, tmp_path) -> str:
    if command == "train":
        return f"latent cache {tmp_path}/nope does not exist; write one with `sdray preprocess`"
    return f"input '{tmp_path}/nope' does not exist"


def test_train_refuses_an_output_inside_its_cache(tmp_path, capsys):
    from pipelines.train import main

    assert main(["--data", str(tmp_path / "cache"), "--out", str(tmp_path / "cache" / "run")]) == 2
    assert "overlap: run files would land in the latent cache" in capsys.readouterr().err


def test_config_errors_name_the_flag_a_value_came_from(tmp_path, capsys):
    from pipelines.data import main as data

    out = ["synth", "--out", str(tmp_path / "d")]
    assert data([*out, "--set", "synth.num_imgs=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set synth.num_imgs: unknown key 'synth.num_imgs'") and ".yaml" not in err
    assert data([*out, "--num-images", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --num-images: synth: num_images")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: {num_imgs: 3}\n")
    assert (
        data([*out, "--config", str(bad), "--set", "synth.seed=1"]) == 2
    )  # the file's fault, not the flag's
    assert capsys.readouterr().err.startswith(f"error: {bad}: unknown key 'synth.num_imgs'")


def test_flag_values_stay_the_text_typed():
    """`--out on` is the folder "on", a prompt with a colon is text: not YAML's bool or mapping."""
    from pipelines.common import flag_overrides, load_config, make_parser

    parser = make_parser("x", None)
    for flag in ("--out", "--prompts", "--lora"):
        parser.add_argument(flag, action="append" if flag == "--lora" else None)
    args = parser.parse_args(
        ["--out", "on", "--prompts", "a photo: dog", "--lora", "runs/a:0.5", "--lora", "1"]
    )
    mapping = {"out": "train.output", "prompts": "batch_generate.prompts", "lora": "batch_generate.loras"}
    cfg = load_config(args, flag_overrides(args, mapping))
    assert (cfg.train.output, cfg.batch_generate.prompts) == ("on", "a photo: dog")
    assert cfg.batch_generate.loras == ("runs/a:0.5", "1")


def test_serve_checks_the_model_folder_and_the_port_before_starting_anything(tmp_path, capsys):
    import socket

    from pipelines.serve import main as serve

    assert serve(["--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: model.path {tmp_path / 'nope'}: does not exist\n"
    (tmp_path / "half" / "unet").mkdir(parents=True)
    assert serve(["--model", str(tmp_path / "half")]) == 2
    assert "not a diffusers model directory (no tokenizer/, text_encoder/, vae/, scheduler/)" in (
        capsys.readouterr().err
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(["--port", str(port)]) == 2
        assert f"error: serve.port {port} on 127.0.0.1: cannot listen" in capsys.readouterr().err
    assert serve(["--port", str(port), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"ok: would serve preset:tiny (random init, seed 0) on http://127.0.0.1:{port}/ (no API key" in out


def test_a_failed_replica_becomes_its_own_error_line():
    from sdray.serve.app import _replica_error

    report = (
        "Deploying application sdray failed: Failed to update the deployments ['SDModel'].\n"
        "ray::ServeReplica:sdray:SDModel.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)\n"
        'Traceback (most recent call last):\n  File "x.py", line 3, in f\n    raise InputError(msg)\n'
        "sdray.errors.InputError: model.path /m: cannot load unet/: bad header\n"
    )
    assert _replica_error(RuntimeError(report)) == "model.path /m: cannot load unet/: bad header"


def test_serve_stopped_by_a_signal_says_stopped_not_resume(capsys):
    from pipelines.common import run

    def body():
        raise KeyboardInterrupt

    assert run(body, interrupted="stopped: sdray serve shut down") == 130
    err = capsys.readouterr().err
    assert "stopped: sdray serve shut down" in err and "resume" not in err


def test_serve_start_drops_serves_options_not_applied_note():
    # serve.run() re-checks the instance `start` configured a moment earlier and logs that new options
    # "will not be applied" although they were: the filter on Serve's logger drops that one line only.
    import logging

    from sdray.serve.app import _AlreadyAppliedFilter

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.serve", logging.INFO, __file__, 1, message, None, None)

    note = (
        'Connecting to existing Serve app in namespace "serve". '
        "New http_options/controller_options will not be applied."
    )
    assert not _AlreadyAppliedFilter().filter(record(note))
    assert _AlreadyAppliedFilter().filter(record("Deployed app 'sdray' successfully."))
