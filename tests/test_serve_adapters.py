"""LoRA adapters behind one Serve endpoint over real HTTP (tiny model): choosing an adapter through the OpenAI
API (also with the official `openai` client), AUTOMATIC1111 `<lora:...>` tags and Serve's multiplexed-model-id
header; equality with `sdray generate --lora`; listing and refresh; LRU eviction; unknown and broken adapters.

One Serve start for the module; the model replica keeps at most 2 adapters (`max_adapters_per_replica`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import shutil

import httpx
import numpy as np
import pytest
from serve_fixtures import decode_png, free_port, make_adapter_store, running_app

from sdray.models.config import ModelConfig
from sdray.serve.config import ServeConfig

pytestmark = pytest.mark.slow  # one Serve start

CFG = ServeConfig(
    port=free_port(),
    default_steps=3,
    max_side=256,
    max_batch_size=4,
    batch_wait_timeout_s=0.3,
    max_adapters_per_replica=2,
)
ADAPTERS = ["blue", "broken", "green", "red", "wide"]
# One request shape for every comparison: (32x32, seed 3, 3 DDIM steps, guidance 5).
OPENAI = {
    "prompt": "a red circle",
    "size": "32x32",
    "seed": 3,
    "steps": 3,
    "scheduler": "ddim",
    "guidance_scale": 5,
}
A1111 = {"width": 32, "height": 32, "seed": 3, "steps": 3, "sampler_name": "DDIM", "cfg_scale": 5}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_adapter_store(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def url(ray_session, tiny_model_dir, store):
    cfg = dataclasses.replace(CFG, adapters=str(store))
    with running_app(cfg, ModelConfig(path=str(tiny_model_dir)), api_key="") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=300) as c:
        yield c


def _model_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("SDModel", app_name="sdray").stats.remote().result()


def _openai(client, **fields) -> np.ndarray:
    r = client.post("/v1/images/generations", json={**OPENAI, **fields})
    assert r.status_code == 200, r.text
    return decode_png(r.json()["data"][0]["b64_json"])


@pytest.fixture(scope="module")
def expected(tiny_model_dir, store):
    """What `sdray generate --lora store/red:0.8` (the library's Sampler with `loras`) makes, and the base."""
    from sdray.models.components import load_components
    from sdray.models.lora import LoraSpec
    from sdray.serve.request import GenerationRequest
    from sdray.serve.sampler import Sampler, to_png

    req = GenerationRequest(
        prompt="a red circle", seeds=(3,), width=32, height=32, steps=3, guidance_scale=5.0, scheduler="ddim"
    )
    images = {}
    for key, loras in {"red@0.8": [LoraSpec(str(store / "red"), 0.8)], "base": []}.items():
        sampler = Sampler(load_components(ModelConfig(path=str(tiny_model_dir))), loras=loras)
        png = to_png(sampler.generate([req])[0][0])
        images[key] = np.asarray(
            __import__("PIL.Image").Image.open(__import__("io").BytesIO(png)).convert("RGB")
        )
    return images


def test_models_and_loras_list_the_store_and_refresh_finds_new_ones(client, base, store):
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids == [base, *(f"{base}:{name}" for name in ADAPTERS)]  # `notes` has no weights file
    assert client.get("/v1/models").json()["data"][1]["parent"] == base
    loras = client.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["path"]) for x in loras] == [(n, str(store / n)) for n in ADAPTERS]
    shutil.copytree(store / "red", store / "late")
    try:
        assert "late" not in [x["name"] for x in client.get("/sdapi/v1/loras").json()]
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert "late" in [x["name"] for x in client.get("/sdapi/v1/loras").json()]
        assert f"{base}:late" in [card["id"] for card in client.get("/v1/models").json()["data"]]
    finally:
        shutil.rmtree(store / "late")
        client.post("/sdapi/v1/refresh-loras")


def test_openai_client_gets_the_image_of_sdray_generate_lora(url, base, expected):
    from openai import OpenAI

    api = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    extra = {k: OPENAI[k] for k in ("seed", "steps", "scheduler", "guidance_scale")}
    result = api.images.generate(
        model=f"{base}:red",
        prompt="a red circle",
        size="32x32",
        response_format="b64_json",
        extra_body={**extra, "lora_scale": 0.8},
    )
    image = decode_png(result.data[0].b64_json)
    assert np.abs(image.astype(int) - expected["red@0.8"]).max() <= 1  # replica's CPU threads: rounding
    assert np.abs(expected["red@0.8"].astype(int) - expected["base"]).max() > 5  # the adapter matters


def test_a1111_client_library_gets_the_adapter_image(url, expected):
    """webuiapi, the Python client for AUTOMATIC1111's API: a `<lora:...>` tag, and the adapters listed."""
    import webuiapi

    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="DDIM", steps=3)
    assert "red" in [lora["name"] for lora in api.get_loras()]
    result = api.txt2img(prompt="a red circle <lora:red:0.8>", width=32, height=32, seed=3, cfg_scale=5)
    image = np.asarray(result.image.convert("RGB"))
    assert np.abs(image.astype(int) - expected["red@0.8"]).max() <= 1
    assert result.info["prompt"] == "a red circle"


def test_a1111_tag_and_header_choose_the_same_adapter(client, base, expected):
    body = {**A1111, "prompt": "a red circle <lora:red:0.8>"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert __import__("json").loads(r.json()["info"])["prompt"] == "a red circle"  # the tag is removed
    tagged = decode_png(r.json()["images"][0])
    assert np.abs(tagged.astype(int) - expected["red@0.8"]).max() <= 1
    # Serve's multiplexed-model-id header, with either API; the body's choice wins over it.
    r = client.post(
        "/v1/images/generations",
        json={**OPENAI, "lora_scale": 0.8},
        headers={"serve_multiplexed_model_id": "red"},
    )
    assert np.abs(decode_png(r.json()["data"][0]["b64_json"]).astype(int) - tagged).max() <= 1
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**A1111, "prompt": "a red circle"},
        headers={"serve_multiplexed_model_id": "red"},
    )
    assert (
        np.abs(decode_png(r.json()["images"][0]).astype(int) - _openai(client, model=f"{base}:red")).max()
        <= 1
    )
    assert np.abs(_openai(client, model=base).astype(int) - expected["base"]).max() <= 1


def test_concurrent_adapters_and_scales_never_mix(client, base):
    choices = [
        {"model": f"{base}:red"},
        {},
        {"model": f"{base}:red", "lora_scale": 0.3},
        {"model": f"{base}:blue"},
    ]
    alone = [_openai(client, **c) for c in choices]
    before = _model_stats()["largest_batch"]
    with cf.ThreadPoolExecutor(len(choices)) as pool:
        together = list(pool.map(lambda c: _openai(client, **c), choices))
    for a, t in zip(alone, together, strict=True):
        assert np.abs(a.astype(int) - t).max() <= 1
    assert len({a.tobytes() for a in alone}) == len(choices)
    assert _model_stats()["largest_batch"] >= max(before, 2)  # they did share a batch


def test_lru_eviction_frees_the_adapter(client, base):
    for name in ["red", "blue", "green"]:
        _openai(client, model=f"{base}:{name}")
    stats = _model_stats()
    assert stats["adapters"] == ["blue", "green"]  # red, least recently used, left the UNet
    per_adapter = stats["lora_parameters"] // 2
    assert per_adapter > 0
    _openai(client, model=f"{base}:red")  # loads again, evicting blue
    stats = _model_stats()
    assert stats["adapters"] == ["green", "red"] and stats["lora_parameters"] == 2 * per_adapter


def test_unknown_adapter_is_404_naming_the_known_ones(client, base):
    r = client.post("/v1/images/generations", json={**OPENAI, "model": f"{base}:nope"})
    assert r.status_code == 404
    assert r.json()["detail"] == f"unknown adapter 'nope'; known adapters: {', '.join(ADAPTERS)}"
    r = client.post("/sdapi/v1/txt2img", json={**A1111, "prompt": "a cat <lora:nope:1>"})
    assert r.status_code == 404 and "known adapters: blue" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={**OPENAI, "model": "other-model:red"})
    assert r.status_code == 404 and base in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**A1111, "prompt": "<lora:red> <lora:blue> a cat"})
    assert r.status_code == 422 and "one <lora:...> tag" in r.json()["detail"]


def test_broken_adapters_fail_their_request_and_the_replica_keeps_serving(client, base):
    batches = _model_stats()["batches"]
    r = client.post("/v1/images/generations", json={**OPENAI, "model": f"{base}:broken"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("adapter 'broken' cannot be loaded: SafetensorError")
    r = client.post("/sdapi/v1/txt2img", json={**A1111, "prompt": "a cat <lora:wide>"})
    assert r.status_code == 422 and "does not fit this model" in r.json()["detail"], r.text
    for _ in range(3):  # three failures in a row would make the replica unhealthy if they counted
        client.post("/v1/images/generations", json={**OPENAI, "model": f"{base}:broken"})
    assert client.get("/healthz").status_code == 200
    _openai(client, model=f"{base}:green")
    stats = _model_stats()
    assert stats["batches"] == batches + 1 and "broken" not in stats["adapters"]  # same replica, no batch
