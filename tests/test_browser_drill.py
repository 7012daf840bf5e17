"""Drill in a real browser: the server dies (SIGKILL) while the chat streams an answer,
and comes back. The page reconnects by itself, the answer resumes and completes, whole,
and the next message is answered, without a reload.

A plain sync test: Playwright's sync API refuses to run inside a running asyncio loop."""

from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.drills import DrillServer

pytestmark = pytest.mark.browser

# The most times any answer bubble has shown the phrase, watched for the page's life.
WATCH_REPEATS = """
window.__repeats = 0;
new MutationObserver(function () {
  document.querySelectorAll(".bubble.assistant").forEach(function (bubble) {
    const shown = bubble.textContent.split("offline demo model").length - 1;
    window.__repeats = Math.max(window.__repeats, shown);
  });
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def test_the_chat_shows_a_run_whose_server_died_resume_and_goes_on(
    browser: Any, tmp_path: Path
) -> None:
    server = DrillServer(tmp_path, AGENT_RUN_LEASE_SECONDS="3", AGENT_OFFLINE_TOKEN_DELAY="0.15")
    try:
        login = server.prepare_and_start()
        context = browser.new_context(base_url=server.url)
        context.add_cookies([{"name": "sessionid", "value": login.session, "url": server.url}])
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.add_init_script(WATCH_REPEATS)
        page.goto(f"/c/{login.conversation}/")
        page.locator("#input").fill("Tell me about yourself")
        page.locator("#input").press("Enter")
        streaming = page.locator(".bubble.assistant.streaming")
        expect(streaming).to_contain_text("offline demo model", timeout=30_000)

        server.kill()
        expect(page.locator("#notice")).to_have_text("Connection lost; reconnecting…")
        server.start()

        footer = page.locator(".run-footer.completed")
        expect(footer).to_be_visible(timeout=60_000)
        # The whole answer, once: the text of the step that was cut was dropped when
        # the run resumed, and streamed again.
        answer = page.locator(".bubble.assistant")
        expect(answer).to_have_count(1)
        expect(answer).to_contain_text("offline demo model")
        expect(answer).to_contain_text("Tell me about yourself")
        # Never twice on the page, not even while the cut step streamed again.
        assert page.evaluate("window.__repeats") == 1
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("#notice")).to_be_hidden()
        page.locator("#input").fill("What is 2 + 2?")
        page.locator("#input").press("Enter")
        expect(page.locator(".run-footer.completed")).to_have_count(2, timeout=60_000)
        assert errors == [], f"JavaScript errors on the page: {errors}"
        context.close()
    finally:
        server.stop()
