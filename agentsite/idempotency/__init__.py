"""Idempotency-Key for every POST that creates something, with Stripe's semantics.

A key is the account's for 24 hours (`KEEP`). Its row is inserted in the transaction that
creates the object, under a unique (account, key) constraint, so two requests with one
key cannot both create, on one instance or many: the second blocks on the first's
insert until it commits, then finds the row. What the request created (`resource`) and,
where it is known by then, its response are stored in that same transaction; nothing is
stored for a request that failed (its transaction rolled back), so retrying it runs it
again, as Stripe does for a request that never began executing.

A later request with the key:
- a different request (method, path, body, caller): 422 `idempotency_key_reused`;
- the same request: the stored response, with `Idempotent-Replayed: true`; where the
  response was not known at commit (a run's `wait` or `stream` response), the creator of
  the endpoint derives it from `resource` (see `chat.runs_api`), or answers 409
  `idempotency_in_flight` while the first request can still be answering it.

Expired keys are deleted lazily (an account's, whenever it claims a key) and by
`manage.py idempotency_prune` (all of them; run it from cron, daily is plenty).
"""
