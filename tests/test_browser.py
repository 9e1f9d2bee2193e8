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


def _screenshot(page, name: str, full_page: bool = True) -> str:
    folder = os.environ.get("LLMHOST_TEST_LOGS", "/tmp")
    path = os.path.join(folder, f"llmhost-{name}.png")
    page.screenshot(path=path, full_page=full_page)
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
    _screenshot(page, "redoc", full_page=False)  # the whole ReDoc page took seconds to render


# -- Markdown answers, images, kept conversations: the shared server and a tiny VLM -----

MARKDOWN = ("## Plan\n\n1. first\n2. second\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
            "```python\nprint('hi')\n```\n\nSee [docs](https://example.com/docs).")
INJECTION = ("**still bold** <img src=x onerror=\"window.pwned = 2\">\n\n"
             "<script>window.pwned = 1</script>\n\n[click](javascript:window.pwned=3) "
             "<iframe src=\"javascript:window.pwned=4\"></iframe>")


@pytest.fixture(scope="module")
def vlm_server(server, tmp_path_factory):
    from llmhost.dev.tinymodels import build_llava

    folder = build_llava(str(tmp_path_factory.mktemp("browser-vlm") / "tiny-llava"))
    server.load(folder, id="browser-vlm", dtype="float32")
    yield server
    import requests
    requests.delete(server.url + "/v1/models/browser-vlm", timeout=60)


@pytest.fixture()
def vpage(browser, vlm_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    elsewhere = []
    page.on("request", lambda r: elsewhere.append(r.url)
            if not r.url.startswith((vlm_server.url, "data:", "blob:")) else None)
    yield page
    context.close()
    assert elsewhere == []


def test_markdown_and_injection_from_kept_conversations(vpage, vlm_server):
    """Answers kept in localStorage render as Markdown after a reload; a
    script-injection answer stays inert text."""
    from playwright.sync_api import expect

    page = vpage
    page.goto(vlm_server.url + "/")
    page.evaluate("""([md, evil]) => localStorage.setItem('llmhost-conversations', JSON.stringify([
        {id: 'md', title: 'markdown', messages: [{role: 'user', content: 'plan?'},
                                                 {role: 'assistant', content: md}]},
        {id: 'evil', title: 'injection', messages: [{role: 'user', content: 'hi'},
                                                    {role: 'assistant', content: evil}]}]))""",
                  [MARKDOWN, INJECTION])
    page.reload()
    expect(page.locator("#conversations option")).to_have_count(2)
    answer = page.locator(".msg.assistant").last
    expect(answer.locator("h2")).to_have_text("Plan")
    expect(answer.locator("ol > li")).to_have_count(2)
    expect(answer.locator("table td")).to_have_count(2)
    expect(answer.locator("pre code")).to_contain_text("print('hi')")
    expect(answer.locator("a")).to_have_attribute("href", "https://example.com/docs")

    page.select_option("#conversations", "evil")
    answer = page.locator(".msg.assistant").last
    expect(answer.locator("strong")).to_have_text("still bold")
    page.wait_for_timeout(500)
    assert page.evaluate("() => window.pwned") is None
    assert answer.locator("script, iframe, img").count() == 0
    assert "<script>" in answer.inner_text()          # shown as text, not run
    for href in answer.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))"):
        assert not (href or "").lower().startswith("javascript:")


def test_image_message_to_a_vision_model(vpage, vlm_server, tmp_path):
    from PIL import Image
    from playwright.sync_api import expect

    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 60)).save(picture)
    page = vpage
    page.goto(vlm_server.url + "/")
    page.select_option("#model", "browser-vlm")
    expect(page.locator("#attach")).to_be_visible()
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "6")
    page.set_input_files("#image", str(picture))
    page.fill("#prompt", "what is this")
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-state", "length", timeout=120_000)
    expect(page.locator(".msg.user img.thumb")).to_have_count(1)
    expect(answer.locator(".meta")).to_contain_text("6 tokens")
    # the conversation is kept across a reload, image included
    page.reload()
    expect(page.locator("#conversations option")).to_have_text(["what is this"])
    expect(page.locator(".msg.user img.thumb")).to_have_count(1)
    expect(page.locator(".msg.assistant")).to_have_count(1)
