"""Server-Sent Events: messages as the spec's parser reads them back, and a response
that streams them with the headers proxies need."""

import json

import pytest

from agentsite.sse import SSE_HEARTBEAT, sse_message, sse_response


def parsed(stream: str) -> list[dict[str, str]]:
    """The messages a browser's EventSource dispatches (the spec's parsing, minus
    `retry`): fields joined per message, data lines joined with newlines."""
    messages, fields, data = [], {}, []
    for line in stream.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data:
                messages.append({**fields, "data": "\n".join(data)})
            fields, data = {}, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
    return messages


def test_a_message_carries_its_id_event_and_data() -> None:
    event = {"type": "token", "seq": 7, "text": "Hi"}
    text = sse_message(json.dumps(event), event="token", id=7)

    assert text == 'id: 7\nevent: token\ndata: {"type": "token", "seq": 7, "text": "Hi"}\n\n'
    assert parsed(text) == [{"id": "7", "event": "token", "data": json.dumps(event)}]


def test_data_of_many_lines_is_one_data_line_each() -> None:
    text = sse_message("one\ntwo\r\nthree\rfour\n")

    assert text == "data: one\ndata: two\ndata: three\ndata: four\ndata: \n\n"
    assert parsed(text) == [{"data": "one\ntwo\nthree\nfour\n"}]


def test_data_alone_and_empty_data() -> None:
    assert sse_message('{"a": 1}') == 'data: {"a": 1}\n\n'
    assert sse_message("") == "data: \n\n"
    assert parsed(sse_message("")) == [{"data": ""}]


def test_a_heartbeat_is_a_comment_no_client_dispatches() -> None:
    stream = SSE_HEARTBEAT + sse_message("x", id=1) + SSE_HEARTBEAT
    assert SSE_HEARTBEAT == ": keep-alive\n\n"
    assert parsed(stream) == [{"id": "1", "data": "x"}]


@pytest.mark.parametrize("field", [{"event": "a\nb"}, {"id": "1\r2"}, {"id": "1\0"}])
def test_an_id_or_event_name_of_more_than_one_line_is_refused(field) -> None:
    with pytest.raises(ValueError):
        sse_message("x", **field)


async def test_the_response_streams_the_messages_with_the_headers_proxies_need() -> None:
    async def messages():
        yield sse_message("é", id=1)
        yield SSE_HEARTBEAT

    response = sse_response(messages())

    assert response["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    assert response.is_async
    chunks = [chunk async for chunk in response.streaming_content]
    assert chunks == ["id: 1\ndata: é\n\n".encode(), b": keep-alive\n\n"]
