"""Tensor dicts as flat vectors and back (the form compressions, aggregators and attacks work on)."""

from __future__ import annotations

from typing import Mapping

import torch


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of `state`, in its order, as one float32 vector on the CPU."""
    if not state:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in state.values()])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten`: tensors shaped, typed and placed like those of `like`."""
    out, offset = {}, 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vector[offset:offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector of {vector.numel()} values does not fill tensors of {offset}")
    return out
