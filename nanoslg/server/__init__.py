"""The OpenAI-compatible HTTP server (Starlette on uvicorn) in front of the engine."""
