"""``hermes serve``: an OpenAI-compatible HTTP server for a streamed model, with continuous batching.

:mod:`~hermes.serve.service` is the library part (no HTTP: :class:`Service`, the budget's split),
:mod:`~hermes.serve.schemas` the wire (pydantic request/response models, the OpenAI error shape) and
:mod:`~hermes.serve.app` the FastAPI app around a service (:func:`create_app`, :func:`serve`).
"""

from __future__ import annotations

from hermes.serve.app import create_app, serve
from hermes.serve.layout import Layout, split_budget
from hermes.serve.schemas import ChatCompletionRequest, CompletionRequest, ServeError
from hermes.serve.service import Sampling, Service

__all__ = ["ChatCompletionRequest", "CompletionRequest", "Layout", "Sampling", "ServeError", "Service", "create_app",
           "serve", "split_budget"]
