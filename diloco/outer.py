"""Outer-loop state shared by the DiLoCo trainers: the fp32 global copy of a set of parameters,
its Nesterov momentum, pseudo-gradients, the write-back into the local model, and the optional
error-feedback pre-quantization of what a peer sends."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from compression import ErrorFeedback, get_codec

from .errors import StateError


def nesterov_step(params: list[Tensor], momenta: list[Tensor], grads: list[Tensor], lr: float,
                  momentum: float) -> None:
    """In place: v <- mu*v + g ; theta <- theta - lr*(g + mu*v).

    This is torch.optim.SGD(nesterov=True, dampening=0, weight_decay=0) with its momentum buffer
    starting at zero (torch's first step sets buf = g, which equals mu*0 + g)."""
    for p, v, g in zip(params, momenta, grads):
        v.mul_(momentum).add_(g)
        p.sub_(g.add(v, alpha=momentum), alpha=lr)


class GlobalCopy:
    """fp32 global parameters theta and outer momentum v for the named parameters `names` of a
    model, kept on `device` (CPU by default: the outer step is rare and memory there is cheap)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], device: torch.device) -> None:
        self.names = [n for n, _ in named]
        self.local = [p for _, p in named]
        self.device = device
        self.params = [p.detach().to(device, torch.float32, copy=True) for p in self.local]
        self.momenta = [torch.zeros_like(t) for t in self.params]

    def pseudo_gradient(self) -> list[Tensor]:
        """Delta = theta_global - theta_local (global minus local), fp32 on `device`."""
        return [g - p.detach().to(self.device, torch.float32) for g, p in zip(self.params, self.local)]

    def step(self, grads: list[Tensor], lr: float, momentum: float) -> None:
        nesterov_step(self.params, self.momenta, grads, lr, momentum)

    @torch.no_grad()
    def write_local(self, alpha: float = 0.0) -> None:
        """local <- (1 - alpha) * theta + alpha * local (alpha = 0 copies theta exactly)."""
        for g, p in zip(self.params, self.local):
            p.copy_(torch.lerp(g.to(p.device), p.float(), alpha))

    def state(self) -> dict[str, dict[str, Tensor]]:
        return {"params": {n: t.clone() for n, t in zip(self.names, self.params)},
                "momenta": {n: t.clone() for n, t in zip(self.names, self.momenta)}}

    def load(self, state: dict[str, dict[str, Tensor]]) -> None:
        for key, dest in (("params", self.params), ("momenta", self.momenta)):
            src = state[key]
            if set(src) != set(self.names):
                raise StateError(f"snapshot {key} names {sorted(src)[:4]}... do not match the "
                                 f"model's {self.names[:4]}...")
            for n, t in zip(self.names, dest):
                if src[n].shape != t.shape:
                    raise StateError(f"snapshot {key}[{n}] has shape {tuple(src[n].shape)}, "
                                     f"model has {tuple(t.shape)}")
                t.copy_(src[n].to(t.device, torch.float32))


class FeedbackQuantizer:
    """Error feedback around a lossy outer-gradient codec (docs/architecture.md §DiLoCo rules):
    e <- e + Delta ; send q = D(C(e)) ; e <- e - q, one residual per fragment.

    A fragment's tensors are flattened in order before quantizing, as collectives.all_reduce
    flattens them, so the codec's blocks line up with the collective's: the values sent are
    exactly representable and the first quantization on the wire loses nothing more; the error
    of this step is carried into the fragment's next sync instead of being dropped."""

    def __init__(self, codec: str, **codec_opts: Any) -> None:
        self.codec = get_codec(codec, **codec_opts)
        self.feedback = ErrorFeedback(self.codec)

    def quantize(self, fragment: int, deltas: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([d.reshape(-1) for d in deltas])
        meta, payload = self.feedback.encode(fragment, flat)
        q = self.codec.decode(meta, payload, device=flat.device)
        return [part.view_as(d) for part, d in zip(q.split([d.numel() for d in deltas]), deltas)]

    def state_dict(self) -> dict[int, Tensor]:
        return self.feedback.state_dict()

    def load_state_dict(self, state: dict[int, Tensor], device: torch.device) -> None:
        self.feedback.load_state_dict(state, device=device)
