from html.parser import HTMLParser

import pytest

from chat.rendering import render_markdown


def test_markdown_and_code_blocks_render() -> None:
    html = render_markdown("**bold** and `code`\n\n```python\nprint('hi')\n```")
    assert "<strong>bold</strong>" in html
    assert "<code>code</code>" in html
    assert '<pre><code class="language-python">' in html


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        "[click](javascript:alert(1))",
        "<svg onload=alert(1)>",
        '<iframe src="https://evil.example"></iframe>',
    ],
)
def test_html_in_messages_is_shown_as_text_never_markup(hostile: str) -> None:
    elements = Elements()
    elements.feed(render_markdown(hostile))
    assert {tag for tag, _ in elements.found} <= {"p", "a"}
    for _, attributes in elements.found:
        for name, value in attributes:
            assert not name.startswith("on")
            assert "javascript" not in (value or "")


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))


def test_hostile_html_remains_readable() -> None:
    assert "&lt;img src=x onerror=alert(1)&gt;" in render_markdown("<img src=x onerror=alert(1)>")


def test_line_breaks_in_a_message_are_kept() -> None:
    assert render_markdown("first line\nsecond line") == "<p>first line<br>\nsecond line</p>\n"


def test_links_are_safe_to_follow() -> None:
    html = render_markdown("[docs](https://example.com)")
    assert 'href="https://example.com"' in html and 'rel="noopener noreferrer nofollow"' in html
