"""LoRA adapters without Ray: the store listing, request parsing (model ids, `<lora:...>` tags, the header), the
HTTP layer's choices and errors in-process, and loading/activating/evicting adapters in a real pipeline.

test_serve_adapters.py covers the same over real HTTP against a running Serve app.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import make_adapter_store

from sdray.models.components import load_components
from sdray.models.config import ModelConfig
from sdray.models.lora import LoraSpec
from sdray.serve import adapters as A
from sdray.serve.api import create_api
from sdray.serve.config import ServeConfig
from sdray.serve.request import Generation, GenerationRequest, ModelInfo
from sdray.serve.sampler import Sampler, to_png

ADAPTERS = ["blue", "broken", "green", "red", "wide"]
REQ = GenerationRequest(
    prompt="a red circle", seeds=(3,), width=32, height=32, steps=3, guidance_scale=5.0, scheduler="ddim"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_adapter_store(tmp_path_factory.mktemp("adapters"))


def test_store_lists_subdirectories_with_weights(store):
    assert list(A.list_adapters(str(store))) == ADAPTERS  # `notes` has no weights file
    assert A.list_adapters(None) == {}
    catalog = A.AdapterCatalog(str(store))
    with pytest.raises(A.UnknownAdapter, match="unknown adapter 'nope'; known adapters: blue, broken, green"):
        catalog.uri("nope")
    with pytest.raises(A.UnknownAdapter, match=r"known adapters: none \(serve.adapters is not set\)"):
        A.AdapterCatalog(None).uri("red")


def test_request_parsing():
    assert A.from_model_field(None, "base") == A.AdapterChoice()
    assert A.from_model_field("base", "base") == A.AdapterChoice()
    assert A.from_model_field("s3://b/m:red", "s3://b/m") == A.AdapterChoice("red")
    with pytest.raises(A.UnknownAdapter, match="unknown model 'other:red'; this endpoint serves 'base'"):
        A.from_model_field("other:red", "base")
    assert A.strip_lora_tags("a red circle <lora:red:0.8>, sharp") == (
        "a red circle, sharp",
        A.AdapterChoice("red", 0.8),
    )
    assert A.strip_lora_tags("<lora:red> a cat") == ("a cat", A.AdapterChoice("red", 1.0))
    assert A.strip_lora_tags("a cat") == ("a cat", None)
    with pytest.raises(A.AdapterError, match="one <lora:...> tag per request, got 2"):
        A.strip_lora_tags("<lora:red> <lora:blue> a cat")
    with pytest.raises(A.AdapterError, match="the weight must be a number"):
        A.strip_lora_tags("<lora:red:x> a cat")
    assert A.from_header("red", "base") == A.AdapterChoice("red")
    with pytest.raises(A.AdapterError, match="scale must be in -4..4"):
        A.AdapterChoice("red", 9).apply(REQ)


class AdapterEchoBackend:
    """Blank PNGs; records the requests that reached it."""

    def __init__(self, store) -> None:
        self.cfg = ServeConfig()
        self.api_key = None
        self.adapters = A.AdapterCatalog(str(store))
        self.seen: list[GenerationRequest] = []

    async def model_info(self) -> ModelInfo:
        return ModelInfo(source="base", native_size=32, size_multiple=8, max_tokens=77)

    async def model_health(self) -> str | None:
        return None

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 2

    async def generate(self, req: GenerationRequest) -> Generation:
        self.seen.append(req)
        return Generation([to_png(np.zeros((8, 8, 3), "float32"))] * len(req.seeds), 1.0, 1)


def test_http_layer_chooses_adapters_and_names_problems(store):
    backend = AdapterEchoBackend(store)
    client = TestClient(create_api(backend))
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["base"] + [
        f"base:{a}" for a in ADAPTERS
    ]
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ADAPTERS
    ok = [
        client.post(
            "/v1/images/generations", json={"prompt": "a cat", "model": "base:red", "lora_scale": 0.5}
        ),
        client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:blue:0.7>"}),
        client.post(
            "/v1/images/generations",
            json={"prompt": "a cat", "lora_scale": 0.6},
            headers={"serve-multiplexed-model-id": "green"},
        ),
        client.post("/v1/images/generations", json={"prompt": "a cat", "model": "base"}),
    ]
    assert [r.status_code for r in ok] == [200] * 4
    assert [(r.adapter, r.adapter_scale, r.prompt) for r in backend.seen] == [
        ("red", 0.5, "a cat"),
        ("blue", 0.7, "a cat"),
        ("green", 0.6, "a cat"),
        ("", 1.0, "a cat"),
    ]
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "model": "base:nope"})
    assert r.status_code == 404 and r.json()["detail"].endswith("known adapters: " + ", ".join(ADAPTERS))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:nope>"})
    assert r.status_code == 404
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "<lora:red> <lora:blue> a cat"})
    assert r.status_code == 422
    assert len(backend.seen) == 4  # refused requests never reach the model


def test_pipeline_adapters_equal_generate_lora_and_eviction_frees_them(store, one_thread):
    """Loaded side by side and switched per batch, an adapter's image equals `sdray generate --lora`'s."""
    expected = Sampler(load_components(ModelConfig()), loras=[LoraSpec(str(store / "red"), 0.8)]).generate(
        [REQ]
    )
    sampler = Sampler(load_components(ModelConfig()))
    base = sampler.generate([REQ])
    red = A.LoadedAdapter(sampler.pipe, "red", str(store / "red"))
    blue = A.LoadedAdapter(sampler.pipe, "blue", str(store / "blue"))  # noqa: F841 - garbage would unload it
    assert A.loaded_adapters(sampler.pipe) == ["blue", "red"]
    two = A.lora_parameters(sampler.pipe)
    A.activate(sampler.pipe, A.AdapterChoice("red", 0.8))
    assert np.array_equal(sampler.generate([REQ])[0][0], expected[0][0])
    A.activate(sampler.pipe, A.AdapterChoice())
    assert np.array_equal(sampler.generate([REQ])[0][0], base[0][0])
    assert np.abs(expected[0][0] - base[0][0]).max() > 0.01
    red.__del__()  # what Serve's multiplex LRU calls on eviction
    assert A.loaded_adapters(sampler.pipe) == ["blue"] and A.lora_parameters(sampler.pipe) == two // 2
    with pytest.raises(A.AdapterError, match="adapter 'broken' cannot be loaded: SafetensorError"):
        A.LoadedAdapter(sampler.pipe, "broken", str(store / "broken"))
    with pytest.raises(A.AdapterError, match="adapter 'wide' cannot be loaded: .*does not fit this model"):
        A.LoadedAdapter(sampler.pipe, "wide", str(store / "wide"))
    assert A.loaded_adapters(sampler.pipe) == ["blue"]  # failed loads leave nothing behind
