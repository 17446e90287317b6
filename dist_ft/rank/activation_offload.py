"""Activation checkpoints in host memory between forward and backward.

Under non-reentrant activation checkpointing (what `model.gradient_checkpointing` enables) autograd
saves, outside the checkpointed layers, little more than each layer's input hidden state: torch's
checkpoint stores its inputs through whatever saved-tensor hooks are active around it and keeps the
layer's inner tensors under its own hooks (measured: a 4-layer stack saves 4 layer inputs and the
loss input, nothing else). A saved-tensor hooks context around the forward therefore moves exactly
the checkpoints to host memory — layers × tokens × hidden values per micro-batch leave the
accelerator — and each comes back when backward reaches its layer. torch's own `save_on_cpu` does
the same moving; this one also counts what it holds (the figure the memory estimate promises),
leaves tensors that already live on the host alone, so a CPU rank pays no copy, and never copies a
parameter: those stay on the accelerator anyway (transformers' LM head, run over zero positions
by our loss, still saves its weight — a full vocabulary × hidden matrix every step).
"""

from __future__ import annotations

import torch

Packed = tuple[torch.device, torch.Tensor]


class HostActivations(torch.autograd.graph.saved_tensors_hooks):
    """`with HostActivations() as held:` — every tensor autograd saves inside is kept in host memory
    (pinned, copied without blocking) until backward needs it; `held.bytes` is their total size."""

    def __init__(self) -> None:
        self.bytes = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> HostActivations:
        super().__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> Packed:
        if _is_parameter(tensor):
            return tensor.device, tensor
        self.bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu":
            return tensor.device, tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    @staticmethod
    def _unpack(packed: Packed) -> torch.Tensor:
        device, tensor = packed
        return tensor.to(device, non_blocking=True)


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (a linear layer saves its weight transposed)."""
    return isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)
