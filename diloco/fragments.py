"""Streaming DiLoCo fragments: strided layer groups.

The model's stack of blocks is the largest container (ModuleList, ModuleDict or Sequential) whose
children are named by integers (pipeline's Llama: `blocks` with keys "0".."n-1"). Block i goes to
fragment i % P, so every fragment spans the depth of the network. Parameters outside the stack
(embedding / tied head, final norm, untied lm_head) are then given, one at a time in model order,
to the fragment holding the fewest elements so far: the embedding of a small Llama is as large as
several blocks, and this keeps the per-sync wire size (peak bandwidth) close to 1/P of the model.
"""
from __future__ import annotations

from torch import nn

from .errors import ConfigError


def _block_stack(model: nn.Module) -> tuple[str, nn.Module] | None:
    best: tuple[int, str, nn.Module] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        keys = [k for k, _ in mod.named_children()]
        if not keys or not all(k.isdigit() for k in keys):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    return None if best is None else (best[1], best[2])


def strided_fragments(model: nn.Module, n_fragments: int) -> list[list[str]]:
    """Partition the trainable parameter names of `model` into `n_fragments` strided groups."""
    if n_fragments < 1:
        raise ConfigError(f"n_fragments must be >= 1, got {n_fragments}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stack = _block_stack(model)
    if stack is None:
        if n_fragments == 1:
            return [[n for n, _ in named]]
        raise ConfigError("no stack of numbered blocks found in the model; pass fragments= "
                          "explicitly (a partition of the parameter names)")
    prefix = f"{stack[0]}." if stack[0] else ""
    frags: list[list[str]] = [[] for _ in range(n_fragments)]
    sizes = [0] * n_fragments
    rest = []
    for n, p in named:
        head, _, tail = n[len(prefix):].partition(".") if n.startswith(prefix) else ("", "", "")
        if head.isdigit() and tail:
            f = int(head) % n_fragments
            frags[f].append(n)
            sizes[f] += p.numel()
        else:
            rest.append((n, p))
    for n, p in rest:
        f = min(range(n_fragments), key=lambda i: (sizes[i], i))
        frags[f].append(n)
        sizes[f] += p.numel()
    if any(not fr for fr in frags):
        raise ConfigError(f"{n_fragments} fragments but the model has only "
                          f"{sum(1 for fr in frags if fr)} non-empty strided groups")
    order = {n: i for i, (n, _) in enumerate(named)}
    return [sorted(fr, key=order.__getitem__) for fr in frags]
