"""The web page at `/` in headless Debian Chromium (playwright drives /usr/bin/chromium; no browser download),
served by the single topology (`serve.topology: single`: API and model in one replica; tests/test_serve.py and
test_serve_adapters.py serve the split one), which the HTTP tests at the end check as such.

`make browser` (part of `make test`) installs chromium when it is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest
from serve_fixtures import free_port, make_adapter_store, running_app

from sdray.models.config import ModelConfig
from sdray.serve.api import read_server_timing
from sdray.serve.config import ServeConfig

CHROMIUM = os.environ.get("SDRAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
]

if shutil.which(CHROMIUM) is None:
    if os.environ.get("CI", "").lower() == "true":  # in CI a missing browser is a broken image, not a skip
        pytest.fail(f"CI=true but Debian chromium is missing ({CHROMIUM}): run `make browser`", pytrace=False)
    pytest.skip(
        "needs Debian chromium: run `make browser` (apt-get install chromium)", allow_module_level=True
    )


# The replica holds at most max_ongoing_requests + max_queued_requests = 3 generations; more get 503.
CFG = dict(default_steps=4, max_side=256, batch_wait_timeout_s=0.0, max_batch_size=2, max_ongoing_requests=2,
           max_queued_requests=1, retry_after_s=4, topology="single")  # fmt: skip


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory):
    store = make_adapter_store(tmp_path_factory.mktemp("adapters"))
    cfg = ServeConfig(port=free_port(), adapters=str(store), **CFG)
    with running_app(cfg, ModelConfig(), api_key="") as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        yield page
        browser.close()


def test_type_prompt_click_generate_image_appears(page):
    page.wait_for_function("document.getElementById('model').textContent.includes('native 64px')")
    page.fill("#prompt", "a large red circle in the top left on a black background")
    page.fill("#negative_prompt", "blurry")
    page.fill("#steps", "3")
    page.fill("#seed", "42")
    page.fill("#size", "48x32")
    page.select_option("#scheduler", "ddim")
    page.click("#generate")
    image = page.wait_for_selector("#images figure img")
    page.wait_for_function("document.querySelector('#images img').naturalWidth > 0")
    assert page.evaluate(
        "[document.querySelector('#images img').naturalWidth, "
        "document.querySelector('#images img').naturalHeight]"
    ) == [48, 32]
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert page.text_content("#images figcaption") == "seed 42"
    assert page.text_content("#error") == ""


def test_api_error_is_shown(page):
    page.fill("#prompt", "a blue square")
    page.fill("#size", "65x64")  # not a multiple of 8: the API answers 422
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    error = page.text_content("#error")
    assert "HTTP 422" in error and "size" in error and "multiple of 8" in error


def test_adapter_selector_sends_the_adapter_and_shows_its_image(page, url):
    import httpx

    page.wait_for_function("document.querySelectorAll('#adapter option').length > 1")
    names = page.eval_on_selector_all("#adapter option", "options => options.map(o => o.textContent)")
    assert names == ["none (base model)", "blue", "broken", "green", "red", "wide"]
    page.fill("#prompt", "a large red circle")
    page.fill("#steps", "3")
    page.fill("#seed", "7")
    page.fill("#size", "32x32")
    page.fill("#n", "1")
    page.select_option("#adapter", label="red")
    page.fill("#lora_scale", "0.8")
    with page.expect_response("**/v1/images/generations") as answer:
        page.click("#generate")
    body = answer.value.request.post_data_json
    assert body["model"].endswith(":red") and body["lora_scale"] == 0.8
    b64 = answer.value.json()["data"][0]["b64_json"]
    page.wait_for_function("(b64) => document.querySelector('#images img').src.endsWith(b64)", arg=b64)
    base = httpx.post(url + "/v1/images/generations", json={**body, "model": None}, timeout=300)
    assert base.json()["data"][0]["b64_json"] != b64  # the adapter changed the image


def test_single_topology_is_one_deployment_that_generates_and_reports_its_batches(url):
    import concurrent.futures as cf

    import httpx
    from ray import serve

    deployments = serve.status().applications["sdray"].deployments
    assert {name: d.status for name, d in deployments.items()} == {"SDServer": "HEALTHY"}
    body = {"prompt": "a red circle", "size": "32x32", "steps": 2, "seed": 3}
    first, again = (httpx.post(url + "/v1/images/generations", json=body, timeout=300) for _ in range(2))
    assert first.status_code == 200 and first.json()["data"] == again.json()["data"]
    timing = read_server_timing(first.headers["Server-Timing"])
    assert 0 < timing["model"] <= timing["ingress"]
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    handle = serve.get_deployment_handle("SDServer", app_name="sdray")
    # in a thread: playwright's sync API keeps an event loop on this one, where handles refuse to block
    with cf.ThreadPoolExecutor(1) as pool:
        stats = pool.submit(lambda: handle.stats.remote().result()).result()
    assert stats["batches"] >= 2 and stats["failures"] == 0


def test_single_topology_refuses_generations_past_its_limit_with_503_and_recovers(url):
    import concurrent.futures as cf

    import httpx

    body = {"prompt": "a busy server", "size": "64x64", "steps": 30}
    with httpx.Client(base_url=url, timeout=300) as client, cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/images/generations", json=body), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 3, codes  # 3 held at once, no 500s
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.headers["Retry-After"] == "4" and "busy" in busy.json()["detail"]
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": "a", "size": "32x32"}).status_code == 200
