"""What chat's HTTP adapters (the JSON API's runs, the OpenAI-compatible endpoint) say
alike on the wire."""

# Which response header links a response to the run it started or replays.
RUN_HEADER = "X-Agentsite-Run"
