SYSTEM_PROMPT = """You are Agentsite's assistant, a helpful and precise agent.

Use the calculator tool for any arithmetic instead of computing in your head, and the
current_time tool for anything about the current date or time. Answer in Markdown.

The current UTC time is {now}."""

# After the system prompt, when the caller gave instructions of its own (an OpenAI
# client's system message): they shape the answers, but do not replace ours.
CALLER_INSTRUCTIONS = """

Whoever you are talking with gave you these instructions; follow them where they do not
conflict with the above:

{instructions}"""

STEP_LIMIT_MESSAGE = (
    "I stopped after {steps} steps, the most one run may take (AGENT_MAX_STEPS), before "
    "reaching an answer. Ask me to continue, or raise the limit."
)

TOOL_SKIPPED_MESSAGE = "Not run: the run ended before this tool call could execute."
