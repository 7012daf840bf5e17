"""Safe rendering of chat text: Markdown in, sanitized HTML out.

Raw HTML in the Markdown source is never passed through (markdown-it escapes it), and
the result is sanitized again with nh3 (Ammonia) as a second line of defence.
"""

import nh3
from markdown_it import MarkdownIt

# `breaks`: a chat message's line breaks are meant, unlike a Markdown document's.
_markdown = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
_ALLOWED_TAGS = {
    "p",
    "br",
    "strong",
    "em",
    "code",
    "pre",
    "blockquote",
    "ul",
    "ol",
    "li",
    "a",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
}


def render_markdown(text: str) -> str:
    html = _markdown.render(text)
    return nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        attributes={"a": {"href", "title"}, "code": {"class"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )
