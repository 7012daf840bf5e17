"""End to end in a real browser: headless Chromium against the real server (see conftest).

These are plain sync tests on purpose: Playwright's sync API refuses to run inside a
running asyncio loop, and pytest-asyncio (auto mode) only starts one for async tests.
"""

import dataclasses
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ROOT, LiveServer, _server_env, new_context

pytestmark = pytest.mark.browser

SCREENSHOT = "/tmp/agentsite-chat.png"
CONVERSATION_URL = re.compile(r"/c/[0-9a-f-]{36}/$")

# Recorded from the first script of every page, so nothing that happens between two
# Playwright polls is missed: each text the streaming bubble shows, and any <img> or
# <script> element that ever enters the message list (even if removed again).
RECORDER = """
window.__streamed = [];
window.__injected = [];
new MutationObserver(function (mutations) {
  const list = document.getElementById("messages");
  if (!list) return;
  mutations.forEach(function (mutation) {
    mutation.addedNodes.forEach(function (node) {
      if (node.nodeType !== 1 || !list.contains(node)) return;
      if (node.matches("img, script") || node.querySelector("img, script")) {
        window.__injected.push(node.outerHTML);
      }
    });
  });
  const streaming = list.querySelector(".bubble.assistant.streaming .content");
  if (streaming) {
    const text = streaming.textContent;
    const seen = window.__streamed;
    if (seen[seen.length - 1] !== text) seen.push(text);
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def signed_in(browser: Any, agentsite_server: LiveServer) -> Any:
    """The cookies of a logged-in browser: one login (slow password hashing) per module."""
    context = new_context(browser, agentsite_server)
    log_in(context.new_page(), agentsite_server)
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def chat(new_page: Callable[..., Page], signed_in: Any) -> Iterator[Page]:
    """A logged-in page on a new, empty conversation; fails on any uncaught JS error."""
    page = new_page(storage_state=signed_in)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(RECORDER)
    page.goto("/")
    page.get_by_role("button", name="+ New conversation").click()
    expect(page.locator("#empty")).to_be_visible()
    yield page
    assert errors == [], f"JavaScript errors on the page: {errors}"


def log_in(page: Page, agentsite_server: LiveServer) -> None:
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_label("Username").fill(agentsite_server.username)
    page.get_by_label("Password").fill(agentsite_server.password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(CONVERSATION_URL)


def ask(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def last_footer(page: Page) -> Any:
    return page.locator("#messages .run-footer").last


def test_question_streams_an_answer_with_a_tool_step_and_survives_reload(
    page: Page, agentsite_server: LiveServer
) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(RECORDER)
    log_in(page, agentsite_server)  # through the login form: a new user lands on a new chat
    notice = page.locator("#offline-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Offline demo model")
    expect(page.locator("#empty")).to_be_visible()

    ask(page, "What is 17 * 23?")

    user = page.locator("#messages .bubble.user")
    expect(user).to_have_count(1)
    expect(user).to_have_text("What is 17 * 23?")
    footer = last_footer(page)
    expect(footer).to_be_visible()
    expect(footer).to_have_class(re.compile(r"\bcompleted\b"))

    # The answer arrived token by token: the streaming bubble grew through many texts,
    # each extending the one before.
    streamed: list[str] = page.evaluate("window.__streamed")
    assert len(streamed) >= 5, streamed
    assert all(a and b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(streamed))
    assert "391" in streamed[-1]
    expect(page.locator("#messages .bubble.streaming, #messages .thinking")).to_have_count(0)
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()

    assert_calculator_step(page)
    answer = page.locator("#messages .bubble.assistant")
    expect(answer).to_have_count(1)
    expect(answer).to_contain_text("391")
    # The streamed plain text was swapped for the server's Markdown rendering.
    expect(answer.locator("strong")).to_have_text("391")
    expect(footer).to_have_text(
        re.compile(r"^\s*\$0\.\d*[1-9] · [1-9]\d* tokens · [1-9]\d* in / [1-9]\d* out · trace\s*$")
    )
    live_usage = footer.inner_text()

    page.reload()

    expect(page.locator("#messages .bubble.user")).to_have_text("What is 17 * 23?")
    expect(page.locator("#messages .bubble.assistant strong")).to_have_text("391")
    assert_calculator_step(page)
    expect(last_footer(page)).to_have_text(live_usage)
    expect(page.locator(".chat-header .title")).to_have_text("What is 17 * 23?")
    expect(page.locator(".conversations li.current")).to_have_text("What is 17 * 23?")
    page.locator("#messages details.step summary").click()
    page.screenshot(path=SCREENSHOT)
    assert errors == [], f"JavaScript errors on the page: {errors}"

    # Every answer links to the trace of the run that produced it.
    last_footer(page).locator("a.trace-link").click()
    expect(page).to_have_url(re.compile(r"/traces/[0-9a-f-]{36}/$"))
    expect(page.locator("body")).to_contain_text("call_model")
    expect(page.locator("body")).to_contain_text("calculator")


def assert_calculator_step(page: Page) -> None:
    step = page.locator("#messages details.step")
    expect(step).to_have_count(1)
    expect(step.locator(".step-name")).to_have_text("calculator")
    expect(step).not_to_have_class(re.compile(r"\brunning\b"))
    # Folded, it shows the result at a glance; the details wait until it is opened.
    expect(step.locator(".step-preview")).to_have_text("→ 391")
    expect(step.locator(".step-result")).to_be_hidden()
    step.locator("summary").click()
    expect(step.locator(".step-args")).to_be_visible()
    expect(step.locator(".step-args")).to_contain_text('"expression": "17 * 23"')
    expect(step.locator(".step-result")).to_have_text("391")
    step.locator("summary").click()
    expect(step.locator(".step-result")).to_be_hidden()


HOSTILE = "Look: <img src=x onerror=alert(1)> and <script>alert(2)</script>"


def test_html_in_messages_is_shown_as_text_and_never_runs(chat: Page) -> None:
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    chat.on("dialog", on_dialog)

    ask(chat, HOSTILE)
    expect(last_footer(chat)).to_be_visible()

    def assert_inert() -> None:
        expect(chat.locator("#messages .bubble.user")).to_have_text(HOSTILE)
        # The offline model quotes what it was told.
        expect(chat.locator("#messages .bubble.assistant blockquote")).to_have_text(HOSTILE)
        expect(chat.locator("#messages img, #messages script")).to_have_count(0)

    assert_inert()
    assert chat.evaluate("window.__injected") == []
    # The same text drawn by the server's template instead of the script.
    chat.reload()
    assert_inert()
    assert chat.evaluate("window.__injected") == []
    assert dialogs == []


def test_stop_ends_a_streaming_answer(chat: Page) -> None:
    # The offline model quotes the question, so a long one makes a long (~3 s) answer.
    question = "Please repeat this slowly: " + " ".join(f"word{n}" for n in range(40))
    ask(chat, question)

    streaming = chat.locator("#messages .bubble.assistant.streaming")
    expect(streaming).to_contain_text("offline")
    chat.locator("#stop").click()

    footer = last_footer(chat)
    expect(footer).to_have_class(re.compile(r"\bcancelled\b"))
    expect(footer.locator(".run-status")).to_have_text("Stopped")
    expect(chat.locator("#stop")).to_be_hidden()
    expect(chat.locator("#send")).to_be_enabled()
    expect(chat.locator("#messages .bubble.streaming")).to_have_count(0)
    # Stopped part-way: the quote of the question at the end never came.
    answer = chat.locator("#messages .bubble.assistant")
    expect(answer).to_contain_text("I am the")
    expect(answer).not_to_contain_text("word39")

    chat.reload()
    expect(last_footer(chat).locator(".run-status")).to_have_text("Stopped")
    expect(chat.locator("#messages .bubble.assistant")).not_to_contain_text("word39")

    # The conversation is usable again after a stop.
    ask(chat, "Hello again")
    expect(chat.locator("#messages .run-footer")).to_have_count(2)
    expect(last_footer(chat)).to_have_class(re.compile(r"\bcompleted\b"))


def test_conversations_are_created_renamed_and_deleted(chat: Page) -> None:
    sidebar = chat.locator(".conversations li")
    before = sidebar.count()
    first_url = chat.url

    chat.get_by_role("button", name="+ New conversation").click()
    expect(chat).not_to_have_url(first_url)
    expect(chat).to_have_url(CONVERSATION_URL)
    expect(sidebar).to_have_count(before + 1)
    expect(chat.locator(".conversations li.current")).to_have_text("New conversation")

    chat.locator(".manage summary").click()
    title = chat.get_by_label("New title")
    title.fill("Renamed by the browser test")
    chat.get_by_role("button", name="Rename", exact=True).click()
    expect(chat.locator(".chat-header .title")).to_have_text("Renamed by the browser test")
    expect(chat.locator(".conversations li.current")).to_have_text("Renamed by the browser test")
    expect(chat).to_have_title(re.compile(r"^Renamed by the browser test"))

    chat.once("dialog", lambda dialog: dialog.accept())
    chat.locator(".manage summary").click()
    chat.get_by_role("button", name="Delete conversation").click()
    expect(chat.locator(".conversations")).not_to_contain_text("Renamed by the browser test")
    expect(sidebar).to_have_count(before)
    expect(chat).to_have_url(CONVERSATION_URL)


def test_a_refused_message_explains_why_and_keeps_the_text(chat: Page) -> None:
    # One character over the limit. The textarea's maxlength stops typing (and Playwright's
    # fill), not a script or an old browser, so the server's check is what is tested.
    box = chat.get_by_label("Message")
    limit = int(box.get_attribute("maxlength") or 0)
    too_long = "x" * (limit + 1)
    box.evaluate("(box, text) => { box.value = text; }", too_long)
    box.press("Enter")

    expect(chat.locator("#notice")).to_be_visible()
    expect(chat.locator("#notice")).to_contain_text(f"the limit is {limit}")
    expect(chat.locator("#messages .bubble")).to_have_count(0)
    expect(chat.get_by_label("Message")).to_have_value(too_long)
    expect(chat.locator("#send")).to_be_enabled()
    expect(chat.locator("#stop")).to_be_hidden()


def test_a_dropped_connection_resumes_the_answer_without_gaps_or_repeats(chat: Page) -> None:
    sockets: list[tuple[Any, Any]] = []
    frames: list[dict[str, Any]] = []  # every frame the server sent, over every socket

    def through_playwright(page_side: Any) -> None:
        server_side = page_side.connect_to_server()

        def forward(message: str | bytes) -> None:
            frames.append(json.loads(message))
            page_side.send(message)

        server_side.on_message(forward)
        sockets.append((page_side, server_side))

    chat.route_web_socket(re.compile(r"/ws/chat/"), through_playwright)
    chat.reload()
    expect(chat.locator("#empty")).to_be_visible()
    ask(chat, "Say something long enough to be cut off: " + "la " * 20)

    expect(chat.locator("#messages .bubble.assistant.streaming")).to_contain_text("offline")
    page_side, server_side = sockets[-1]
    page_side.close(code=4000, reason="network blip")  # what a flaky network does
    server_side.close()

    expect(chat.locator("#notice")).to_contain_text("reconnecting")
    expect(last_footer(chat)).to_have_class(re.compile(r"\bcompleted\b"))
    expect(chat.locator("#notice")).to_be_hidden()
    assert len(sockets) == 2

    # The two sockets together delivered every event of the run...
    run_frames = [f for f in frames if "seq" in f]
    final_seq = next(f["seq"] for f in run_frames if f["type"] == "run.completed")
    assert {f["seq"] for f in run_frames} == set(range(1, final_seq + 1))
    # ...and the page drew each token exactly once, in order: its last streamed text is
    # all the tokens, and every text it showed extended the one before.
    tokens = {f["seq"]: f["text"] for f in run_frames if f["type"] == "token"}
    streamed: list[str] = chat.evaluate("window.__streamed")
    assert streamed[-1] == "".join(tokens[seq] for seq in sorted(tokens))
    assert all(b.startswith(a) for a, b in itertools.pairwise(streamed))
    answer = chat.locator("#messages .bubble.assistant")
    expect(answer).to_have_count(1)
    live = answer.inner_text()

    chat.reload()
    expect(chat.locator("#messages .bubble.assistant")).to_have_text(live)


def set_daily_budget(server: LiveServer, username: str, money_per_day_usd: Decimal) -> None:
    """Give `username` (created if new) an account whose only limit is this daily budget,
    in the server's own database, as an operator would in the admin."""
    script = (
        "from decimal import Decimal\n"
        "from django.contrib.auth import get_user_model\n"
        "from billing.services import account_for_user\n"
        f"user, new = get_user_model().objects.get_or_create(username={username!r})\n"
        f"if new: user.set_password({server.password!r}); user.save()\n"
        "account = account_for_user(user_id=user.pk)\n"
        "account.plan = None\n"  # no default plan: this budget is the only limit
        f"account.money_per_day_usd = Decimal({str(money_per_day_usd)!r})\n"
        "account.save(update_fields=['plan', 'money_per_day_usd'])\n"
    )
    subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=_server_env(server.log.parent),  # the server's workdir holds its log
        check=True,
        capture_output=True,
        timeout=60,
    )


def budgeted_chat(
    new_page: Callable[..., Page], server: LiveServer, username: str, money_per_day_usd: Decimal
) -> tuple[Page, list[str]]:
    """A new user's first chat, under a daily budget of its own (the shared test user's
    account is left alone), and the list its JavaScript errors go to."""
    set_daily_budget(server, username, money_per_day_usd)
    page = new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    log_in(page, dataclasses.replace(server, username=username))
    expect(page.locator("#empty")).to_be_visible()
    return page, errors


def money_left_today(text: str) -> Decimal:
    found = re.match(r"Budget left today: \$([\d.,]+) of ", text)
    assert found, text
    return Decimal(found[1].replace(",", ""))


def test_the_budget_left_goes_down_as_the_user_chats(
    new_page: Callable[..., Page], agentsite_server: LiveServer
) -> None:
    chat, errors = budgeted_chat(new_page, agentsite_server, "budget-spender", Decimal("1"))
    budget = chat.locator("#budget")
    expect(budget).to_have_text("Budget left today: $1.0000 of $1.00 · resets 00:00 UTC")
    before = budget.inner_text()

    ask(chat, "What is 17 * 23?")

    expect(last_footer(chat)).to_have_class(re.compile(r"\bcompleted\b"))
    # Updated by the run's final event, without a reload.
    expect(budget).not_to_have_text(before)
    after = budget.inner_text()
    assert 0 < money_left_today(after) < money_left_today(before), (before, after)
    expect(budget).not_to_have_class(re.compile(r"\bexhausted\b"))

    # The live line reads exactly as the page draws it.
    chat.reload()
    expect(budget).to_have_text(after)
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_a_message_over_the_daily_budget_is_refused_with_a_warning(
    new_page: Callable[..., Page], agentsite_server: LiveServer
) -> None:
    username = "budget-exhausted"
    chat, errors = budgeted_chat(new_page, agentsite_server, username, Decimal("1"))
    budget = chat.locator("#budget")
    expect(budget).not_to_have_class(re.compile(r"\bexhausted\b"))
    # An operator lowers the budget below one call while the page is open.
    set_daily_budget(agentsite_server, username, Decimal("0.00001"))

    ask(chat, "What is 17 * 23?")

    footer = last_footer(chat)
    expect(footer).to_have_class(re.compile(r"\bbudget_exceeded\b"))
    expect(footer.locator(".run-status")).to_have_text("Budget reached")
    expect(footer.locator(".run-error")).to_contain_text("daily budget of $0.00001")
    expect(footer.locator(".run-error")).to_contain_text("raise it")
    expect(chat.locator("#messages .bubble.assistant")).to_have_count(0)
    expect(chat.locator("#send")).to_be_enabled()
    # The final event turned the budget line into a warning, without a reload.
    expect(budget).to_have_class(re.compile(r"\bexhausted\b"))
    expect(budget).to_have_text("Budget left today: $0.00001 of $0.00001 · resets 00:00 UTC")

    chat.reload()
    expect(budget).to_have_class(re.compile(r"\bexhausted\b"))
    expect(last_footer(chat).locator(".run-status")).to_have_text("Budget reached")
    expect(last_footer(chat).locator(".run-error")).to_contain_text("daily budget of $0.00001")
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_the_api_docs_render_offline(page: Page, agentsite_server: LiveServer) -> None:
    # No internet: every request to another host fails, as on an offline machine.
    elsewhere: list[str] = []

    def this_server_only(route: Any) -> None:
        if route.request.url.startswith(agentsite_server.url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", this_server_only)
    page.goto("/api/docs")

    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Agentsite API")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible()
    assert elsewhere == [], f"the docs asked other hosts for: {elsewhere}"
