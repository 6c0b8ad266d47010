"""The Serve app over real HTTP on localhost (tiny model): both APIs, seeds, batching, bad input, auth, 503s.

One Serve start for the whole module (module-scoped fixture on the session's Ray).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request
from typing import Any

import httpx
import numpy as np
import pytest
from serve_fixtures import decode_png, free_port, running_app

from sdray.models.config import ModelConfig
from sdray.serve.api import read_server_timing
from sdray.serve.config import ServeConfig

pytestmark = pytest.mark.slow  # one Serve start (~15 s idle, a minute on a loaded 2-core machine)

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CFG = ServeConfig(
    port=free_port(),
    default_steps=4,
    max_steps=50,
    max_side=256,
    max_images=4,
    max_batch_size=4,
    batch_wait_timeout_s=0.2,
    max_ongoing_requests=4,
    # Room for the batching test's burst of 4: Serve counts a request as queued until the router has
    # assigned it, so on a loaded machine all 4 can be "queued" at once (2 refused one in CI).
    max_queued_requests=4,
    retry_after_s=3,
    max_body_bytes=16384,
)


@pytest.fixture(scope="module")
def url(ray_session, tiny_model_dir):
    with running_app(CFG, ModelConfig(path=str(tiny_model_dir)), api_key=API_KEY) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


def _model_stats() -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("SDModel", app_name="sdray").stats.remote().result()


def test_openai_api_returns_pngs_of_requested_size_and_count(client):
    r = client.post(
        "/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "48x32", "seed": 5}
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6]
    images = [decode_png(d["b64_json"]) for d in data]
    assert [im.shape for im in images] == [(32, 48, 3), (32, 48, 3)]
    assert not np.array_equal(images[0], images[1])
    # Server-Timing: the model replica's sampler + PNG time, inside the ingress handler's time.
    timing = read_server_timing(r.headers["Server-Timing"])
    assert 0 < float(timing["model"]) <= float(timing["ingress"])


def test_the_model_replica_runs_jemalloc(client):
    """serve.allocator's default reaches the replica's process (its preload checked in /proc/self/maps)."""
    assert _model_stats()["allocator"] == "jemalloc"


def test_a1111_api_returns_pngs_info_and_parameters(client):
    body = {
        "prompt": "a blue square",
        "batch_size": 3,
        "width": 40,
        "height": 24,
        "sampler_name": "DDIM",
        "seed": 9,
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [decode_png(im).shape for im in out["images"]] == [(24, 40, 3)] * 3
    info = json.loads(out["info"])
    assert info["all_seeds"] == [9, 10, 11] and info["seed"] == 9 and info["sampler_name"] == "DDIM"
    assert out["parameters"]["steps"] == CFG.default_steps and out["parameters"]["cfg_scale"] == 7.5


def test_random_seed_is_reported_and_reproduces(client):
    first = client.post("/v1/images/generations", json={"prompt": "a green triangle", "size": "32x32"}).json()
    seed = first["data"][0]["seed"]
    again = client.post(
        "/v1/images/generations", json={"prompt": "a green triangle", "size": "32x32", "seed": seed}
    )
    assert again.json()["data"][0]["b64_json"] == first["data"][0]["b64_json"]  # same seed -> same PNG bytes
    other = client.post(
        "/v1/images/generations", json={"prompt": "a green triangle", "size": "32x32", "seed": seed + 1}
    )
    assert other.json()["data"][0]["b64_json"] != first["data"][0]["b64_json"]


def test_batched_equals_single(client):
    bodies = [
        {"prompt": p, "seed": s, "size": "32x32", "scheduler": "euler_a", "steps": 6}
        for p, s in [("a cat", 1), ("a dog on grass", 2), ("a red square", 3), ("stars", 4)]
    ]
    before = _model_stats()
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        batched = list(pool.map(lambda b: client.post("/v1/images/generations", json=b), bodies))
    after = _model_stats()
    assert all(r.status_code == 200 for r in batched), [r.text for r in batched]
    # Served in fewer batches than requests: at least two shared one UNet call per step.
    assert after["batches"] - before["batches"] < len(bodies) and after["largest_batch"] >= 2
    for body, r in zip(bodies, batched, strict=True):
        alone = client.post("/v1/images/generations", json=body)
        a, b = decode_png(r.json()["data"][0]["b64_json"]), decode_png(alone.json()["data"][0]["b64_json"])
        # Float images agree within ~1e-6 (tests/test_sampler.py); PNG rounding may flip a rare pixel by 1.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_health_models_openapi_and_page(client, url):
    assert client.get("/healthz").json()["status"] == "ok"
    card = client.get("/v1/models").json()["data"][0]
    assert card["native_size"] == 64 and card["size_multiple"] == 8 and card["max_tokens"] == 77
    assert card["limits"] == {"max_steps": 50, "max_side": 256, "max_images": 4}
    spec = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/healthz", "/v1/models"} <= set(spec["paths"])
    page = httpx.get(url + "/")  # no key needed for the page
    assert page.status_code == 200 and "v1/images/generations" in page.text


def test_auth_required_on_api_not_on_health(url):
    body = {"prompt": "a cat"}
    assert httpx.post(url + "/v1/images/generations", json=body).status_code == 401
    wrong = httpx.post(url + "/sdapi/v1/txt2img", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200


BAD_REQUESTS = [
    # (path, json body, status, field named in the answer, text in the message)
    ("/v1/images/generations", {"prompt": ""}, 422, "prompt", "at least 1 character"),
    ("/v1/images/generations", {"prompt": "   "}, 422, "prompt", "must not be empty"),
    (
        "/v1/images/generations",
        {"prompt": "red " * 90},
        422,
        "prompt",
        "is 92 tokens; the text encoder takes at most 77",
    ),
    (
        "/v1/images/generations",
        {"prompt": "a", "negative_prompt": "x " * 80},
        422,
        "negative_prompt",
        "82 tokens",
    ),
    ("/v1/images/generations", {"prompt": "a", "steps": 0}, 422, "steps", "greater than or equal to 1"),
    ("/v1/images/generations", {"prompt": "a", "steps": 51}, 422, "steps", "must be in 1..50, got 51"),
    ("/v1/images/generations", {"prompt": "a", "n": 5}, 422, "n", "must be in 1..4, got 5"),
    ("/v1/images/generations", {"prompt": "a", "n": 0}, 422, "n", "greater than or equal to 1"),
    ("/v1/images/generations", {"prompt": "a", "size": "65x64"}, 422, "size", "multiple of 8"),
    ("/v1/images/generations", {"prompt": "a", "size": "512x512"}, 422, "size", "8..256 pixels, got 512"),
    ("/v1/images/generations", {"prompt": "a", "size": "big"}, 422, "size", "should match pattern"),
    (
        "/v1/images/generations",
        {"prompt": "a", "guidance_scale": 99},
        422,
        "guidance_scale",
        "less than or equal",
    ),
    ("/v1/images/generations", {"prompt": "a", "scheduler": "lms"}, 422, "scheduler", "'ddim', 'euler'"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, 422, "response_format", "b64_json"),
    ("/v1/images/generations", {"prompt": "a", "seed": -3}, 422, "seed", "greater than or equal to 0"),
    ("/v1/images/generations", {"n": 1}, 422, "prompt", "Field required"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "width": 100}, 422, "width", "multiple of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "cfg_scale": -1}, 422, "cfg_scale", "greater than or equal to 0"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "batch_size": 9}, 422, "batch_size", "must be in 1..4, got 9"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "Heun"}, 422, "sampler_name", "'Euler a'"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "steps": "many"}, 422, "steps", "valid integer"),
]


@pytest.mark.parametrize(("path", "body", "status", "field", "message"), BAD_REQUESTS)
def test_bad_request_gets_4xx_naming_the_field(client, path, body, status, field, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][-1] == field and message in d["msg"] for d in detail), detail


def test_malformed_json_huge_body_and_no_length(client):
    bad_json = client.post(
        "/v1/images/generations", content=b'{"prompt": "a",', headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"
    huge = client.post("/v1/images/generations", json={"prompt": "a", "pad": "x" * 20000})
    assert huge.status_code == 413 and "16384 bytes" in huge.json()["detail"]
    chunked = client.post("/v1/images/generations", content=iter([b'{"prompt": "a"}']))  # no Content-Length
    assert chunked.status_code == 411
    # Still serving after all of that.
    ok = client.post("/v1/images/generations", json={"prompt": "a", "size": "32x32"})
    assert ok.status_code == 200


def test_overload_gets_503_with_retry_after_then_recovers(client):
    body = {"prompt": "a busy server", "size": "64x64", "steps": 30}
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/images/generations", json=body), range(16)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 503}, codes  # some served, the rest refused cleanly: no 500s
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["Retry-After"] == "3" and "busy" in busy.json()["detail"]
    assert client.post("/v1/images/generations", json={"prompt": "a", "size": "32x32"}).status_code == 200
    assert client.get("/healthz").status_code == 200


def test_request_over_its_timeout_gets_408_and_the_app_keeps_serving(client):
    # Serve's proxy enforces `request_timeout_s`; the per-request header overrides it, so a short one here
    # exercises the same path without a second Serve start. 10 steps with guidance take well over 50 ms.
    slow = {"prompt": "a slow request", "size": "64x64", "steps": 10}
    r = client.post("/v1/images/generations", json=slow, headers={"x-request-timeout-seconds": "0.05"})
    assert r.status_code == 408, r.text
    assert "timed out after 0.05s" in r.text
    assert client.post("/v1/images/generations", json={"prompt": "a", "size": "32x32"}).status_code == 200


def _serve_metrics() -> dict[tuple[str, str], float]:
    """{(sample name, reason or adapter tag): value summed over replicas} from this node's Prometheus port."""
    from prometheus_client.parser import text_string_to_metric_families

    from sdray.serve.metrics import metrics_url

    text = httpx.get(metrics_url(), timeout=30).text
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_sdray_"):
                key = (sample.name, sample.labels.get("reason") or sample.labels.get("adapter", ""))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def test_serve_metrics_reach_the_prometheus_endpoint(client, url):
    for seed in (1, 2):
        body = {"prompt": "a red circle", "n": 2, "size": "32x32", "seed": seed, "steps": 2}
        assert client.post("/v1/images/generations", json=body).status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": ""}).status_code == 422
    assert httpx.post(url + "/v1/images/generations", json={"prompt": "x"}).status_code == 401
    wanted = {
        ("ray_sdray_images_generated_total", "base"): 4,
        ("ray_sdray_requests_total", "base"): 2,
        ("ray_sdray_requests_rejected_total", "invalid"): 1,
        ("ray_sdray_requests_rejected_total", "unauthorized"): 1,
        ("ray_sdray_batch_size_count", ""): 1,
        ("ray_sdray_queue_wait_seconds_count", ""): 2,
        ("ray_sdray_sampler_step_seconds_count", ""): 1,
    }
    deadline = time.monotonic() + 90  # Ray exports custom metrics every few seconds
    while True:
        seen = _serve_metrics()
        missing = {k: (seen.get(k), v) for k, v in wanted.items() if seen.get(k, 0) < v}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"(metric, tag): (seen, wanted at least): {missing}"
    # sampler seconds per denoising step: positive and far below a request's whole time
    per_step = (
        seen[("ray_sdray_sampler_step_seconds_sum", "")] / seen[("ray_sdray_sampler_step_seconds_count", "")]
    )
    assert 0 < per_step < 60


def test_oversized_body_gets_a_readable_413_with_urllib(url):
    # urllib sends the whole body before reading: the server must read it too, or the client sees a reset.
    body = json.dumps({"prompt": "a", "pad": "x" * 20_000_000}).encode()
    request = urllib.request.Request(
        url + "/v1/images/generations", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == 413 and "16384 bytes" in json.loads(refused.value.read())["detail"]


def test_bad_request_in_a_batch_fails_alone_and_short_buckets_finish_first(client):
    from ray import serve

    from sdray.errors import InputError
    from sdray.serve.request import GenerationRequest

    def req(steps: int, scheduler: str = "euler", seed: int = 1) -> GenerationRequest:
        return GenerationRequest("a cat", (seed,), 32, 32, steps, 1.0, scheduler)

    handle = serve.get_deployment_handle("SDModel", app_name="sdray")
    # Two calls at a time: well inside the 4 the module's app queues in front of the model.
    before = _model_stats()
    # Past the ingress's checks (the handle is called directly): a scheduler the sampler refuses.
    long, bad = (handle.generate.remote(r) for r in (req(30), req(2, "nope")))
    assert len(long.result().pngs) == 1
    with pytest.raises(InputError, match="unknown 'nope'"):
        bad.result()
    assert _model_stats()["failures"] == before["failures"] == 0  # a batch with a good answer is no failure
    before = _model_stats()
    long, short = (handle.generate.remote(r) for r in (req(30, seed=3), req(2, seed=2)))
    assert len(long.result().pngs) == 1 and len(short.result().pngs) == 1
    if (
        _model_stats()["batches"] - before["batches"] == 1
    ):  # both shared one batch: the 2-step bucket went first
        assert short.result().model_ms < long.result().model_ms / 2
