"""Traces are records of what happened: operators read them, nobody edits them."""

from django.contrib import admin
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from agentsite.admin import ReadOnlyAdmin

from .models import Span, Trace
from .selectors import trace_flatten, trace_tree


@admin.register(Trace)
class TraceAdmin(ReadOnlyAdmin):
    list_display = (
        "run_id",
        "user",
        "status",
        "model",
        "started_at",
        "duration_ms",
        "span_count",
        "input_tokens",
        "output_tokens",
        "cost_usd",
    )
    list_filter = ("status", "model", "started_at")
    search_fields = ("run__id", "user__username", "error_type")
    list_select_related = ("user",)
    date_hierarchy = "started_at"
    readonly_fields = ("span_tree",)

    @admin.display(description="Span tree")
    def span_tree(self, trace: Trace) -> SafeString:
        rows = [
            (
                node.depth * 1.5,
                node.span.kind,
                node.span.name,
                node.span.status,
                f"+{node.offset_ms:.1f} ms",
                f"{node.span.duration_ms:.1f} ms",
                _tokens(node.span),
                f"{node.span.error_type}: {node.span.error_message}"
                if node.span.error_type
                else "",
            )
            for node in trace_flatten(roots=trace_tree(trace=trace))
        ]
        body = format_html_join(
            "",
            '<tr><td style="padding-left:{}em">{} <strong>{}</strong></td>'
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            rows,
        )
        return format_html(
            "<table><thead><tr><th>Span</th><th>Status</th><th>Start</th><th>Duration</th>"
            "<th>Tokens (in/out)</th><th>Error</th></tr></thead><tbody>{}</tbody></table>",
            body,
        )


def _tokens(span: Span) -> str:
    if not span.input_tokens and not span.output_tokens:
        return ""
    return f"{span.input_tokens}/{span.output_tokens}"


@admin.register(Span)
class SpanAdmin(ReadOnlyAdmin):
    list_display = ("name", "kind", "status", "trace", "started_at", "duration_ms")
    list_filter = ("kind", "status")
    search_fields = ("name", "trace__run__id", "error_type")
    raw_id_fields = ("trace", "parent")
