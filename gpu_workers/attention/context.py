"""The step-scoped forward context. The model runner sets it before a forward pass so attention layers reach the
backend (and its plan for this step) without threading batch metadata through every model signature."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

from gpu_workers.attention.base import AttentionBackend

_backend: Optional[AttentionBackend] = None


def current_backend() -> AttentionBackend:
    if _backend is None:
        raise RuntimeError("attention called outside a model-runner step")
    return _backend


@contextmanager
def forward_context(backend: AttentionBackend):
    global _backend
    previous, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = previous
