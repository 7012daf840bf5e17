"""Fakes of the outside world for tests: real servers speaking real wire formats.

Only the outside world is faked (design brief, house style 8): our code, the provider
SDKs and the HTTP stack all run for real against these servers.

- `openai_server.FakeOpenAIServer`: the OpenAI Chat Completions API.
- `anthropic_server.FakeAnthropicServer`: the Anthropic Messages API.
- `base`: what they share (the threaded HTTP server, the reply script, the recorded
  requests); build a fake of another HTTP API on `base.FakeLLMServer`.
"""
