"""Error feedback (error compensation) around a lossy codec.

Per tensor key k with residual e_k (fp32, on the input's device):
    v   = x + gamma * e_k          # gamma = 1: classic error feedback (1-bit Adam)
    send C(v)
    e_k = v - D(C(v))
With gamma = 1 nothing is lost, only delayed: sum_t D(C(v_t)) = sum_t x_t - e_T, and each
residual is bounded by the codec's error bound for that step. gamma < 1 damps the feedback
(EControl, Gao et al., regulates its strength for heterogeneous, non-IID workers).
How DiLoCo uses it: docs/architecture.md §DiLoCo rules.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch

from .base import Codec


class ErrorFeedback:
    """Stateful wrapper: `meta, payload = ef.encode(key, x)`; residuals are kept per key on x's
    device in fp32 and can be checkpointed with state_dict()/load_state_dict(). Not thread-safe:
    use one instance from one thread (the codec itself is stateless and shareable)."""

    def __init__(self, codec: Codec, gamma: float = 1.0) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"ErrorFeedback wraps a Codec, got {type(codec).__name__}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"ErrorFeedback gamma must be in [0, 1], got {gamma!r}")
        self.codec = codec
        self.gamma = float(gamma)
        self._residuals: dict[Hashable, torch.Tensor] = {}

    def encode(self, key: Hashable, x: torch.Tensor) -> tuple[dict[str, Any], memoryview | bytes]:
        """Encode x plus the carried residual of `key`; updates the residual to what was lost."""
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or not x.is_floating_point():
            raise ValueError("ErrorFeedback.encode expects a 1-D float tensor")
        residual = self._residuals.get(key)
        if residual is None:
            v = x.to(torch.float32, copy=True)
        elif residual.shape != x.shape or residual.device != x.device:
            raise ValueError(
                f"key {key!r}: residual has shape {tuple(residual.shape)} on {residual.device}, "
                f"input has {tuple(x.shape)} on {x.device}; call reset({key!r}) first"
            )
        else:
            # Out of place: if encode rejects the input (non-finite), the old residual survives.
            v = torch.add(x, residual, alpha=self.gamma)
        meta, payload = self.codec.encode(v)
        v.sub_(self.codec.decode(meta, payload, device=v.device))
        self._residuals[key] = v
        return meta, payload

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The current residual of `key` (None if never encoded or reset)."""
        return self._residuals.get(key)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget one key's residual, or all of them."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def state_dict(self) -> dict[Hashable, torch.Tensor]:
        """Residuals (CPU copies) for checkpoints; error-feedback state is part of a peer's state."""
        return {k: v.cpu().clone() for k, v in self._residuals.items()}

    def load_state_dict(self, state: dict[Hashable, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Replace all residuals with `state`, placed on `device` as fp32."""
        self._residuals = {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in state.items()}
