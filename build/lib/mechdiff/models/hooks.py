"""Forward hooks that always come off: every handle is removed in ``finally``.

Factories follow ``<operation>_<site>_<pre|post>_hook``; :func:`hooks` registers them on the real
Hugging Face modules (no model rewrite).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

Hook = tuple[torch.nn.Module, Callable]


@contextlib.contextmanager
def hooks(post: Iterable[Hook] = (), pre: Iterable[Hook] = ()) -> Iterator[None]:
    """Register forward (post) and forward-pre hooks for the duration of the block."""
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn))
        for module, fn in post:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def output_tensor(output):
    """The hidden-state tensor of a module output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_output(output, new: torch.Tensor):
    """``output`` with its hidden-state tensor replaced by ``new`` (same container type)."""
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
