"""The documented cluster workflow, run as a user runs it: `ray start --head`, one `ray job submit` per stage,
`serve deploy` against the same head (docs/cluster.md, "Try it on one machine").

One head for the whole module (its own ports, temp dir and token; dashboard on; stopped by its own process
group, never a blanket `ray stop`). Every command below is a line of docs/cluster.md, checked verbatim, and
runs through bash with the same $VARIABLES the docs export. What this relies on: `ray job submit` sets
RAY_ADDRESS for the job's driver (sdray joins that cluster), a job's stdout and stderr are what `ray job logs`
shows, and the entry points print one `error: ...` line and exit 2 on bad input. Nothing here depends on where
the drivers' own Ray logs go.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cluster_fixtures import REPO, RayHead, run_shell
from s3_fixtures import free_port

pytestmark = pytest.mark.slow

DOCS = REPO / "docs" / "cluster.md"
STEPS = 2  # training steps: the last one is checkpointed and exported
BAD_JOB = "sdray-bad-input"

MKDIR = "mkdir -p $RUN"
TOKEN = 'python -c "import secrets; print(secrets.token_hex(32))" > $RAY_AUTH_TOKEN_PATH'
HEAD = (
    "ray start --head --block --temp-dir=$RUN/ray --node-ip-address=127.0.0.1 --port=$GCS_PORT"
    " --dashboard-host=127.0.0.1 --dashboard-port=$DASHBOARD_PORT --dashboard-agent-listen-port=$AGENT_PORT"
    " --dashboard-agent-grpc-port=$AGENT_GRPC_PORT --metrics-export-port=$METRICS_PORT"
    " --runtime-env-agent-port=$RUNTIME_ENV_PORT --ray-client-server-port=$CLIENT_PORT --num-cpus=4"
    " --include-dashboard=true --disable-usage-stats"
)
NO_TOKEN = "env -u RAY_AUTH_MODE ray job list"
TOKEN_IN_ENV = 'env -u RAY_AUTH_TOKEN_PATH RAY_AUTH_TOKEN="$(cat $RAY_AUTH_TOKEN_PATH)" ray job list'
SUBMIT = "ray job submit --working-dir . -- "
ENV_CHECK = (
    SUBMIT
    + 'python -c "import sys, ray, torch, sdray; print(sys.prefix, ray.__version__, torch.__version__)"'
)
STAGES = {
    "synth": SUBMIT + "python -m pipelines.data synth --out $RUN/synth --num-images 16 --resolution 64",
    "preprocess": SUBMIT
    + "python -m pipelines.preprocess --config tiny --input $RUN/synth --output $RUN/cache",
    "train": SUBMIT
    + f"python -m pipelines.train --config tiny --data $RUN/cache --out $RUN/train --workers 2"
    f" --steps {STEPS} --set train.batch_size=4",
    "export": SUBMIT + "python -m pipelines.export"
    f" --checkpoint $RUN/train/ray/train/checkpoint-step-{STEPS:08d} --out $RUN/model",
}
BAD_INPUT = (
    f"ray job submit --submission-id {BAD_JOB} --working-dir . -- python -m pipelines.train --config tiny"
    " --data $RUN/synth --out $RUN/bad"
)
BAD_STATUS = f"ray job status {BAD_JOB}"
BAD_LOGS = f"ray job logs {BAD_JOB}"
SERVE_CONFIG = (
    'sed -e "s/port: 8000/port: $SERVE_PORT/" -e "s|# - model.path=[^ ]*|- model.path=$RUN/model|"'
    " pipelines/serve.yaml > $RUN/serve.yaml"
)
SERVE_DEPLOY = "serve deploy $RUN/serve.yaml --address $RAY_ADDRESS"
HEALTH = "curl -sf http://127.0.0.1:$SERVE_PORT/healthz"
REQUEST = (
    "curl -sS --fail-with-body http://127.0.0.1:$SERVE_PORT/sdapi/v1/txt2img -H 'Content-Type: application/json'"
    """ -d '{"prompt": "a red circle", "steps": 2, "seed": 1}'"""
)
SERVE_STATUS = "serve status --address $RAY_ADDRESS"
SERVE_SHUTDOWN = "serve shutdown --address $RAY_ADDRESS --yes"
COMMANDS = [
    MKDIR, TOKEN, HEAD, NO_TOKEN, TOKEN_IN_ENV, ENV_CHECK, *STAGES.values(), BAD_INPUT, BAD_STATUS, BAD_LOGS,
    SERVE_CONFIG, SERVE_DEPLOY, HEALTH, REQUEST, SERVE_STATUS, SERVE_SHUTDOWN,
]  # fmt: skip


def documented_commands(text: str) -> set[str]:
    """Command lines of the markdown's bash blocks: continuations joined, whitespace collapsed, comments cut."""
    lines: set[str] = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s{2,}# ", line)[0]  # a trailing comment (two spaces, #, space)
            if line.strip():
                lines.add(" ".join(line.split()))
    return lines


@dataclass
class Walkthrough:
    """What the documented commands printed, and how long each phase took."""

    run: Path
    env: dict[str, str]
    out: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def sh(self, name: str, command: str, *, check: bool = True, timeout: float = 600):
        start = time.monotonic()
        proc = run_shell(command, self.env, timeout=timeout)
        self.seconds[name] = round(time.monotonic() - start, 1)
        self.out[name] = proc
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{command!r} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc


def _environment(run: Path) -> dict[str, str]:
    names = ("GCS", "DASHBOARD", "AGENT", "AGENT_GRPC", "METRICS", "RUNTIME_ENV", "CLIENT", "SERVE")
    ports = {name: free_port() for name in names}
    venv_bin = str(Path(sys.executable).parent)  # the project's environment first on the head's PATH
    return {
        **os.environ,
        **{f"{name}_PORT": str(port) for name, port in ports.items()},
        "RUN": str(run),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(run / "auth_token"),
        "RAY_ADDRESS": f"http://127.0.0.1:{ports['DASHBOARD']}",
        # Ray's start-up timeouts (60 s for the raylet, and for the dashboard agent's port file, after which the
        # raylet aborts) are too short for a busy CI machine.
        "RAY_raylet_start_wait_time_s": "600",
        "RAY_agent_register_timeout_ms": "600000",
    }


def _serve(w: Walkthrough) -> None:
    w.sh("serve_config", SERVE_CONFIG)
    w.sh("serve_deploy", SERVE_DEPLOY)
    deadline = time.monotonic() + 300
    while w.sh("health", HEALTH, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the Serve application did not become healthy in 300 s"
        time.sleep(0.25)
    w.seconds["serve_ready"] = w.seconds["serve_deploy"] + round(300 - (deadline - time.monotonic()), 1)
    w.sh("request", REQUEST)
    w.sh("serve_status", SERVE_STATUS)
    w.sh("serve_shutdown", SERVE_SHUTDOWN)
    w.out["health_after_shutdown"] = run_shell(HEALTH, w.env).returncode


def _jobs_api(w: Walkthrough) -> list[dict]:
    """Every job on the head, from the job REST API (with the token, as the CLI sends it)."""
    token = (w.run / "auth_token").read_text().strip()
    request = urllib.request.Request(
        f"{w.env['RAY_ADDRESS']}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def walkthrough():
    run = Path(tempfile.mkdtemp(prefix="sdray-jobs-"))  # short: Ray's socket paths live under it
    w = Walkthrough(run=run, env=_environment(run))
    head_env = {k: v for k, v in w.env.items() if k != "RAY_ADDRESS"}  # terminal 1 of the docs
    head = RayHead(HEAD, head_env, temp_dir=run / "ray", log=run / "head.log")
    start = time.monotonic()
    try:
        w.sh("mkdir", MKDIR)
        w.sh("token", TOKEN)
        ready = head.start_ready(int(w.env["DASHBOARD_PORT"]), int(w.env["AGENT_PORT"]))
        w.seconds["head_ready"] = round(ready, 1)
        w.sh("no_token", NO_TOKEN, check=False)
        w.sh("token_in_env", TOKEN_IN_ENV)
        # Two jobs that need nothing of the stages run beside them (each job is mostly one process importing
        # on one core): the environment check beside synth, the bad-input job beside export.
        with ThreadPoolExecutor(max_workers=1) as beside:
            env_check = beside.submit(w.sh, "env_check", ENV_CHECK)
            for name, command in STAGES.items():
                if name == "export":
                    bad_input = beside.submit(w.sh, "bad_input", BAD_INPUT, check=False)
                w.sh(name, command)
                if name == "synth":
                    env_check.result()
            bad_input.result()
        w.sh("bad_status", BAD_STATUS)
        w.sh("bad_logs", BAD_LOGS)
        w.out["jobs"] = _jobs_api(w)
        _serve(w)
        yield w
    finally:
        stop = time.monotonic()
        head.stop()
        w.seconds["head_stop"] = round(time.monotonic() - stop, 1)
        w.seconds["total"] = round(time.monotonic() - start, 1)
        print(f"\njob walkthrough timings (s): {json.dumps(w.seconds)}")
        shutil.rmtree(run, ignore_errors=True)


def test_docs_show_exactly_the_commands_this_test_runs():
    documented = documented_commands(DOCS.read_text())
    missing = [c for c in COMMANDS if " ".join(c.split()) not in documented]
    assert not missing, f"docs/cluster.md lacks these command lines: {missing}"


def test_a_client_without_the_token_setting_is_refused_and_the_token_can_come_from_the_environment(
    walkthrough,
):
    refused = walkthrough.out["no_token"]
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr
    assert walkthrough.out["token_in_env"].returncode == 0  # RAY_AUTH_TOKEN, as CI passes a secret


def test_jobs_run_in_the_projects_pinned_environment(walkthrough):
    import ray
    import torch

    printed = walkthrough.out["env_check"].stdout
    assert f"{sys.prefix} {ray.__version__} {torch.__version__}" in printed


def test_each_stage_is_a_job_that_succeeds_and_writes_its_outputs(walkthrough):
    run = walkthrough.run
    for name in STAGES:
        assert "succeeded" in walkthrough.out[name].stdout + walkthrough.out[name].stderr, name
    summary = json.loads((run / "cache" / "_summary.json").read_text())
    assert (summary["rows_in"], summary["rows_written"], summary["rows_rejected"]) == (16, 16, 0)
    assert f"trained to step {STEPS}" in walkthrough.out["train"].stdout
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == STEPS
    for model in (run / "train" / "model", run / "model"):  # exported by train, then by the export job
        assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (model / "model_index.json").is_file()
    statuses = {job["submission_id"]: job["status"] for job in walkthrough.out["jobs"]}
    assert sorted(statuses.values()) == ["FAILED"] + ["SUCCEEDED"] * (len(STAGES) + 1)  # + the env check
    # The drivers of the Ray stages joined this head (a driver that started a private Ray would have no job_id)
    joined = {job["entrypoint"].split()[2] for job in walkthrough.out["jobs"] if job.get("job_id")}
    assert {"pipelines.preprocess", "pipelines.train"} <= joined, walkthrough.out["jobs"]


def test_a_job_with_bad_input_fails_with_its_error_line_in_the_logs(walkthrough):
    out = walkthrough.out
    assert out["bad_input"].returncode == 1  # `ray job submit` exits 1 when the job fails
    status = out["bad_status"].stdout + out["bad_status"].stderr
    assert f"Job '{BAD_JOB}' failed" in status and "failed with exit code 2" in status  # the CLI's exit code
    errors = [line for line in out["bad_logs"].stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "synth" in errors[0], out["bad_logs"].stdout[-3000:]
    assert "Traceback" not in out["bad_logs"].stdout
    assert not (walkthrough.run / "bad" / "model").exists()


def test_serve_deploy_answers_with_the_exported_model_and_shuts_down(walkthrough):
    from PIL import Image

    health = json.loads(walkthrough.out["health"].stdout)
    assert health == {"status": "ok", "model": str(walkthrough.run / "model")}
    answer = json.loads(walkthrough.out["request"].stdout)
    (png,) = answer["images"]
    image = Image.open(io.BytesIO(base64.b64decode(png)))
    assert image.format == "PNG" and image.size[0] > 0
    status = yaml.safe_load(walkthrough.out["serve_status"].stdout)
    app = status["applications"]["sdray"]
    assert app["status"] == "RUNNING"
    assert {name: d["status"] for name, d in app["deployments"].items()} == {
        "SDModel": "HEALTHY",
        "SDIngress": "HEALTHY",
    }
    assert walkthrough.out["health_after_shutdown"] != 0  # nothing answers after `serve shutdown`
