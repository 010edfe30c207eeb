"""`tapestry serve`: an HTTP API over `tapestry.infer` (native Documents, OpenAI-compatible images
and chat endpoints, SSE streaming, a web page, Prometheus metrics, cross-request step batching,
and a Ray Serve deployment). Needs the `serve` extra (FastAPI, uvicorn, prometheus-client)."""
