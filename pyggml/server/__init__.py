"""`pyggml serve`: an OpenAI-compatible HTTP server (and llama.cpp's own endpoints) over a GGUF model.

    app.py      routes, API key, OpenAI error shapes, server-sent events (the HTTP layer only)
    shapes.py   request checks and response shapes (OpenAI's and llama.cpp's)
    engine.py   the engine interface the routes call, and LlamaEngine: one Llama, one request at a time
    main.py     serve(): load the model, run uvicorn

Needs the `server` extra (pip install "pyggml[server]": starlette, uvicorn); engine.py and shapes.py do not.
"""
from __future__ import annotations

__all__ = ["create_app", "serve", "ServerSettings"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("serve", "ServerSettings"):
        from . import main

        return getattr(main, name)
    raise AttributeError(f"module 'pyggml.server' has no attribute {name!r}")
