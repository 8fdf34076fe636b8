"""Forward hooks on a model's named modules, removed when the block ends (what measuring a layer's inputs or
swapping its weight in as it runs needs), and the logits of a model's output."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch


@contextmanager
def module_hooks(model, names: Iterable[str], pre: Callable | None = None, post: Callable | None = None,
                 with_kwargs: bool = False) -> Iterator[None]:
    """`pre(name, module, args)` before and `post(name, module, args, output)` after each named module runs;
    `with_kwargs` passes the call's keyword arguments to `pre` after `args`."""
    handles = []
    try:
        for name in names:
            module = model.layer_module(name)
            if pre is not None:
                if with_kwargs:
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args, kwargs, name=name: pre(name, m, args, kwargs), with_kwargs=True))
                else:
                    handles.append(module.register_forward_pre_hook(lambda m, args, name=name: pre(name, m, args)))
            if post is not None:
                handles.append(module.register_forward_hook(
                    lambda m, args, output, name=name: post(name, m, args, output)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits(output) -> torch.Tensor:
    """A causal LM's logits, whether the model returns an output object or the tensor itself."""
    return output.logits if hasattr(output, "logits") else output
