"""The chat page and the API docs in a real browser: Debian's chromium driven by
Playwright (its own browser downloads are not used: `executable_path` points at
the system's), against README's Quick start server with SmolLM2. Offline: every
request must go to the server itself."""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
# ReDoc's "API docs by Redocly" footer logo is an <img> from redocly's site, hard-coded in
# redoc.standalone.js: the pages' Content-Security-Policy (llmhost/http/pages.py) blocks it,
# so the browser never sends it. A request elsewhere counts unless the policy blocked it.

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, quickstart):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.elsewhere, page.blocked = [], []
    page.on("request", lambda r: page.elsewhere.append(r.url)
            if not r.url.startswith((quickstart.url, "data:", "blob:")) else None)
    page.on("requestfailed", lambda r: page.blocked.append(r.url) if r.failure == "csp" else None)
    yield page
    context.close()
    assert [url for url in page.elsewhere if url not in page.blocked] == []


def _screenshot(page, name: str) -> str:
    folder = os.environ.get("LLMHOST_TEST_LOGS", "/tmp")
    path = os.path.join(folder, f"llmhost-{name}.png")
    page.screenshot(path=path, full_page=True)
    return path


def test_chat_streams_an_answer_and_stops(page, quickstart):
    from playwright.sync_api import expect

    page.goto(quickstart.url + "/")
    expect(page.locator("#model")).to_have_value("smollm2")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_contain_text("Paris", timeout=120_000)  # appears while it streams
    expect(answer).to_have_attribute("data-state", "stop", timeout=120_000)
    expect(answer.locator(".meta")).to_contain_text("tokens/s")
    expect(answer.locator(".meta")).to_contain_text("TTFT")

    # A long answer, stopped once it has started: it stops growing, the page says so.
    page.fill("#temperature", "0.8")
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.")
    page.click("#send")
    story = page.locator(".msg.assistant").last
    expect(story).to_have_attribute("data-state", "streaming")
    page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant')].pop()"
                           ".textContent.length > 40", timeout=120_000)
    page.click("#stop")
    expect(story).to_have_attribute("data-state", "stopped", timeout=30_000)
    stopped = story.inner_text()
    page.wait_for_timeout(1500)
    assert story.inner_text() == stopped
    expect(page.locator("#send")).to_be_enabled()
    shot = _screenshot(page, "chat")
    assert os.path.getsize(shot) > 10_000


def test_models_panel_loads_with_progress_and_unloads(page, quickstart, tiny_models):
    from playwright.sync_api import expect

    page.goto(quickstart.url + "/")
    page.click("#admin summary")
    page.fill("#load-source", tiny_models["llama"])
    page.fill("#load-id", "panel-llama")
    page.click("#load-form button")
    expect(page.locator("#load-status")).to_contain_text("Loaded panel-llama", timeout=120_000)
    item = page.locator("#models li", has_text="panel-llama")
    expect(item).to_contain_text("generate")
    expect(page.locator("#model option", has_text="panel-llama")).to_have_count(1)
    item.locator("button").click()
    expect(page.locator("#models li", has_text="panel-llama")).to_have_count(0)


def test_docs_render_offline(page, quickstart):
    from playwright.sync_api import expect

    page.goto(quickstart.url + "/docs")
    expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions")).to_have_count(1, timeout=60_000)
    assert page.locator(".opblock").count() >= 8
    page.goto(quickstart.url + "/redoc")
    expect(page.get_by_role("button", name="post /v1/chat/completions")).to_have_count(1, timeout=60_000)
    expect(page.get_by_role("button", name="post /v1/embeddings")).to_have_count(1)
    _screenshot(page, "redoc")
