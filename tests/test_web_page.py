"""The web page at `/` in headless Debian Chromium (playwright drives /usr/bin/chromium; no browser download).

`make browser` (part of `make test`) installs chromium when it is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest
from serve_fixtures import free_port, make_adapter_store, running_app

from sdray.models.config import ModelConfig
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


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory):
    store = make_adapter_store(tmp_path_factory.mktemp("adapters"))
    cfg = ServeConfig(
        port=free_port(), default_steps=4, max_side=256, batch_wait_timeout_s=0.0, adapters=str(store)
    )
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
