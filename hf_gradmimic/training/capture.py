"""Autograd plumbing: record every use of the mimic tensors in a forward, and start the backward at the logits.

`Capture` hooks the modules that hold mimic tensors around the training forward only, so recomputation
under activation checkpointing (which runs during backward) is not recorded twice. `Capture.ghost_batch`
takes ``δ = ∂root/∂z`` at every recorded output ``z`` in one ``autograd.grad`` and returns the
`hf_gradmimic.ghost.GhostBatch` the scorers read.

With the built-in losses, which read the model only through its logits ``z``, the backward of
``Σ_i c_i ℓ_i`` equals a backward started at ``z`` with ``c_i δ_i`` (``δ = ∂Σℓ/∂z``, needed for the
scores anyway): `BackwardFromLogits` does that, so the loss's own graph (a ``[B, T, vocab]`` log-softmax
for a language model) is differentiated once, as in plain `Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ghost import GhostBatch, LayerUse

GradientEdge = torch.autograd.graph.GradientEdge


@dataclass
class _Call:
    name: str
    module: nn.Module
    activations: torch.Tensor
    output: torch.Tensor | GradientEdge
    tensor_keys: dict[str, str]


class Capture:
    """Forward hooks recording, for one forward, each call of the hooked modules: its input and its output.

    Args:
        hooked: ``(name, module, tensor_keys)`` for every module holding a mimic tensor.
        layer_names: the named mimic layers (each must run in the forward).
    """

    def __init__(self, hooked: list[tuple[str, nn.Module, dict[str, str]]], layer_names: list[str]) -> None:
        self.hooked = hooked
        self.layer_names = layer_names
        self.calls: list[_Call] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for name, module, keys in self.hooked:
            self._handles.append(module.register_forward_hook(self._hook(name, keys), with_kwargs=True))
        return self

    def _hook(self, name: str, keys: dict[str, str]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            layer_input = args[0] if args else next(iter(kwargs.values()))
            self.calls.append(_Call(name, module, layer_input.detach(), output, keys))

        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def activations(self) -> dict[str, torch.Tensor]:
        """Each named mimic layer's input at its first call (the head's features, for a head)."""
        first: dict[str, torch.Tensor] = {}
        for call in self.calls:
            if call.name in self.layer_names:
                first.setdefault(call.name, call.activations)
        return first

    def only_output(self) -> torch.Tensor | GradientEdge | None:
        """The output of the single recorded call, when exactly one call was recorded (a head), else None."""
        return self.calls[0].output if len(self.calls) == 1 else None

    def cut_at(self, logits: torch.Tensor) -> GradientEdge:
        """The logits' gradient edge, which names them in ``autograd.grad`` without keeping them alive; a recorded
        output that *is* the logits is replaced by it."""
        if not logits.requires_grad:
            raise RuntimeError(
                "The model's logits do not require grad: is every parameter frozen, or the forward run under "
                "torch.no_grad?"
            )
        edge = torch.autograd.graph.get_gradient_edge(logits)
        for call in self.calls:
            if call.output is logits:
                call.output = edge
        return edge

    def check_ran(self) -> None:
        """Every named mimic layer ran in the forward."""
        ran = {call.name for call in self.calls}
        missing = [name for name in self.layer_names if name not in ran]
        if missing:
            raise RuntimeError(f"Mimic layer(s) {missing} did not run in the forward pass.")

    @staticmethod
    def check_requires_grad(calls: list[_Call]) -> None:
        """The outputs of ``calls`` are part of the autograd graph."""
        if not all(call.output.requires_grad for call in calls):
            raise RuntimeError(
                "The mimic layers' outputs do not require grad: are the mimic layers frozen, or run under "
                "torch.no_grad or reentrant activation checkpointing?"
            )

    @staticmethod
    def check_used(calls: list[_Call], grads: tuple[torch.Tensor | None, ...]) -> None:
        """The loss reached every call's output (``grads`` from ``autograd.grad(..., allow_unused=True)``)."""
        unused = sorted({call.name for call, grad in zip(calls, grads) if grad is None})
        if unused:
            raise RuntimeError(
                f"The loss does not depend on the output of mimic layer(s) {unused}; pick layers the loss uses."
            )

    def ghost_batch(
        self, root: torch.Tensor | GradientEdge, root_grad: torch.Tensor | None = None, retain_graph: bool = True
    ) -> GhostBatch:
        """The recorded calls with ``∂root/∂z`` at each output ``z``: ``root`` is Σ_i ℓ_i, or the logits' edge with
        ``root_grad`` = δ there (a vector-Jacobian product; a call whose output *is* that edge gets δ itself)."""
        self.check_ran()
        grads: dict[int, torch.Tensor] = {i: root_grad for i, call in enumerate(self.calls) if call.output is root}
        pending = [i for i in range(len(self.calls)) if i not in grads]
        self.check_requires_grad([self.calls[i] for i in pending])
        if pending:
            found = torch.autograd.grad(
                root,
                [self.calls[i].output for i in pending],
                grad_outputs=root_grad,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            self.check_used([self.calls[i] for i in pending], found)
            grads.update(zip(pending, found))
        return GhostBatch(
            [
                LayerUse(call.name, call.module, call.activations, grads[i], call.tensor_keys)
                for i, call in enumerate(self.calls)
            ]
        )


class PendingGrad:
    """The gradient at the logits that `BackwardFromLogits` hands on, known only after the scores."""

    grad: torch.Tensor | None = None


class BackwardFromLogits(torch.autograd.Function):
    """A zero scalar whose backward hands ``pending.grad`` to ``output``: ``backward()`` of it starts at ``output``.

    When every parameter reaches the loss only through the logits z, ∂(Σ_i c_i ℓ_i)/∂z_i = c_i δ_i with
    δ = ∂Σℓ/∂z, which the scores needed anyway. The node is made right after the forward and the gradient set
    later, so that nothing has to keep the logits alive in between. The gradient is scaled in place by the
    upstream one and handed on once, as `Trainer` backpropagates.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, pending: PendingGrad) -> torch.Tensor:
        ctx.pending = pending
        return output.new_zeros(())

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad, ctx.pending.grad = ctx.pending.grad, None
        if grad is None:
            raise RuntimeError("MimicTrainer's loss was backpropagated twice, or before its logits' gradient was set.")
        return grad.mul_(upstream), None


def scale_per_sample(tensor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``tensor[i] * coefficients[i]``, in place when the layout allows (the tensor can be vocabulary-sized).
    The product is formed in the coefficients' float32 and rounded once to the tensor's dtype (bf16 logits)."""
    scale = coefficients.detach().view(-1, *([1] * (tensor.dim() - 1)))
    return tensor.mul_(scale) if tensor.is_contiguous() else (tensor * scale).to(tensor.dtype)
