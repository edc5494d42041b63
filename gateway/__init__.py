"""The gateway: OpenAI-compatible and native HTTP APIs in front of the Redis job queue.

``create_app(settings)`` in ``gateway.app`` builds the FastAPI application; ``python -m gateway`` serves
it with uvicorn. A request is validated and tokenized here, admitted (auth, per-key concurrency, queue
capacity), put on its model's Redis stream as a ``Job`` and answered from the ``TokenEvent`` batches
workers publish on this gateway's channel (``gateway.dispatcher``).
"""
