"""Activation capture with forward hooks, at chosen token positions, overlapped with compute on GPU.

Shapes: ``input_ids``/``attention_mask`` (batch, seq); ``positions`` (n_sel, 2) int64 rows of
``(batch_index, token_index)``; every captured site gives (n_sel, d_site) in the model's dtype (or
``out_dtype``). On CUDA the selected rows are gathered on the device inside the hook and copied to
pinned host memory on a side stream, so the copy overlaps with the next layers' compute; the
forward's own stream never waits on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechdiff.models.architecture import adapter_for, parse_site
from mechdiff.models.hooks import hooks, output_tensor


def attended_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, 2) rows ``(batch, pos)`` of every attended token, in row-major order."""
    return attention_mask.nonzero(as_tuple=False)


class _HostSink:
    """Receives device tensors and copies them to host (async into pinned memory on CUDA)."""

    def __init__(self):
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per GPU the model spans
        self.out: dict[str, torch.Tensor] = {}

    def put(self, name: str, t: torch.Tensor) -> None:
        if t.device.type != "cuda":
            self.out[name] = t.detach().to("cpu", copy=True)
            return
        stream = self.streams.setdefault(t.device, torch.cuda.Stream(t.device))
        ready = torch.cuda.current_stream(t.device).record_event()
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t.detach(), non_blocking=True)
            t.record_stream(stream)
        self.out[name] = buf

    def finish(self) -> dict[str, torch.Tensor]:
        for stream in self.streams.values():
            stream.synchronize()
        return self.out


def _select(t: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor] | None, out_dtype) -> torch.Tensor:
    sel = t if idx is None else t[idx[0].to(t.device), idx[1].to(t.device)]  # (n_sel, d); a split model spans GPUs
    return sel if out_dtype is None else sel.to(out_dtype)


@torch.inference_mode()
def capture(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            sites: Sequence[str], positions: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None, return_logits: bool = False):
    """Run one forward and return ``{site: (n_sel, d)}`` host tensors (and the logits if asked).

    ``positions`` defaults to every attended token. Logits, when returned, are (n_sel, vocab) at the
    same positions, on the host in float32.
    """
    adapter = adapter_for(model)
    device = next(model.parameters()).device  # inputs follow the model (the embedding's device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if positions is None:
        positions = attended_positions(attention_mask)
    idx = (positions[:, 0].to(device), positions[:, 1].to(device))
    sink = _HostSink()

    def post_hook(name):
        return lambda _m, _i, out: sink.put(name, _select(output_tensor(out), idx, out_dtype))

    def pre_hook(name):
        return lambda _m, args: sink.put(name, _select(args[0], idx, out_dtype))

    post, pre = [], []
    for site in sites:
        _, kind = parse_site(site)
        (pre if kind == "attn.o_proj_in" else post).append(
            (adapter.module(site), (pre_hook if kind == "attn.o_proj_in" else post_hook)(site)))
    with hooks(post=post, pre=pre):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    acts = sink.finish()
    if return_logits:
        return acts, out.logits[idx[0].to(out.logits.device), idx[1].to(out.logits.device)].float().cpu()
    return acts
