"""The OpenAI-compatible endpoint: `/openai/v1/chat/completions` and `/openai/v1/models`,
so that any OpenAI SDK or chat front end talks to the Agentsite agent unchanged (only its
`base_url` and `api_key`). Every request is a run like any other: the agent's tools run
on the server, and the run is traced, priced and held to the account's budget.

How the OpenAI protocol maps onto the agent (decisions, for the README):

- History. An OpenAI client sends the whole conversation each time. Unbound, a request
  starts a new conversation (`source=openai`, titled by its first user message) whose
  run is fed every turn given: earlier ones are stored as the run's `imported`
  messages, the last user message is the one answered. With the header
  `X-Agentsite-Conversation: <id>` the request continues that stored conversation:
  only its last user message is new, the agent remembers the rest itself.
- System (and `developer`) messages are the caller's instructions: given to the model
  after the agent's own system prompt, never instead of it (the agent keeps its tools
  and rules). Several are joined in order. They hold for that request's run only: a
  later request in a bound conversation brings its own again, as OpenAI clients do.
- Tools are the agent's, executed on the server. A client's own tools cannot be offered
  (`tools`/`functions` other than empty, assistant `tool_calls`, `tool`/`function`
  messages are refused with a 400 that says so): a client cannot execute a call the
  agent makes, and nothing it answers could be fed back into a run.
- Tool steps are not streamed as content (they would end up in the client's copy of
  the history and be sent back as if the assistant had said them); they are in the
  run's trace, linked by the `X-Agentsite-Trace` header (the JSON API's URL of it;
  `X-Agentsite-Trace-Page`: the page, for a signed-in browser).
- Options the agent's configuration governs (`max_tokens`, `temperature`, `top_p`,
  `stop`, `seed`, ...) are accepted and ignored; `n` must be 1; `model`, when given,
  must be the one `/models` lists.
- Disconnects cancel, without an Idempotency-Key. A client that closes the connection
  before the answer is complete (the "stop" button of chat front ends, a timeout) stops
  the run, as OpenAI stops generating: it has no way to come back for the answer, and
  the run would go on spending. (The `/api/v1` runs are detached instead.)
- Idempotency-Key, as in /api/v1 (`agentsite.idempotency`, `chat.services.run_start`):
  the SDKs retry a timeout or a dropped connection on their own, never having seen
  `x-should-retry: false`, and without a key that runs the agent again. With a key a
  retry starts nothing: it gets the stored completion (non-streamed, stored once the
  run is over), or the run's events again as chunks (streamed; the answer in one chunk
  if the log expired), or 409 `idempotency_in_flight` while the run answers; another
  body with the key is a 422. And a client with a key that leaves does not stop its run:
  it can come back for the answer, so its retry gets the one run's answer, not a cancel
  it never asked for (a run cancelled otherwise replays its 409 `cancelled`).
- Answer text: the run's assistant messages (before and after tool calls) joined with a
  blank line, as `RunOut.answer`; streamed, a "\n\n" delta where a message follows a
  tool step (tokens do not say which message they are in).
- Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` and
  status: 400 bad request, 401 bad key, 403 key without the `runs` scope, 404 unknown
  model or conversation, 409 the conversation is busy, 429 rate or budget limits (with
  `Retry-After` when it is known), 5xx the run failed (502: the model provider); 405 a
  wrong method, 422 a reused Idempotency-Key. A response to a request that started a
  run says `x-should-retry: false`, so the SDKs do not retry it (see Idempotency-Key
  for the retries they make all the same). A run that fails after its stream started
  ends it with a `data: {"error": {...}}` event (the SDKs raise `APIError`), and no
  `data: [DONE]`, so no client takes a cut answer for a whole one.
"""
