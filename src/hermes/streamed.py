"""The class of a model ``hermes.load`` returns: the checkpoint's own transformers class with one mixin in front,
declared here (not patched onto the object afterwards).

- ``device`` is the CPU: the parameters live on the meta device between calls (transformers' ``device`` is the
  first parameter's), and ``generate`` moves its inputs to ``model.device``.
- A generating model's ``generate`` reserves the call's KV cache and activations inside the budget, chooses the
  units kept resident across tokens, and runs the call as one continuous pipeline, around transformers' own
  ``generate`` (``hermes.generation.budgeted_generate``).

The subclass keeps the class's name, module and docstring; ``isinstance`` against the transformers class holds.
"""
from __future__ import annotations

import functools
from typing import Any

import torch


class StreamedModel:
    """Mixin of every streamed model: computed on the CPU, its weights streamed by ``self.hermes``."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class StreamedGenerator(StreamedModel):
    """Mixin of a streamed model that generates: ``generate`` under the budget."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        engine = getattr(self, "hermes", None)
        if engine is None:  # a skeleton not loaded by hermes.load: transformers' own generate
            return super().generate(*args, **kwargs)  # type: ignore[misc]
        from hermes.generation import budgeted_generate

        return budgeted_generate(self, engine, super().generate, args, kwargs)  # type: ignore[misc]


@functools.cache
def streamed_class(cls: type) -> type:
    """The streamed subclass of transformers class ``cls`` (one per class)."""
    if issubclass(cls, StreamedModel):
        return cls
    generates = callable(getattr(cls, "can_generate", None)) and cls.can_generate()
    mixin = StreamedGenerator if generates else StreamedModel
    return type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                             "__qualname__": cls.__qualname__})


def stream_inner_models(model: torch.nn.Module) -> None:
    """Give every transformers model inside ``model`` (a VLM's text and vision models) the streamed class too:
    their ``device`` is the CPU, not the meta device of their first parameter between calls (Idefics3 moves its
    embeddings ``.to(self.device)``)."""
    from transformers import PreTrainedModel

    for name, sub in model.named_modules():
        if name and isinstance(sub, PreTrainedModel) and not isinstance(sub, StreamedModel):
            sub.__class__ = streamed_class(type(sub))
