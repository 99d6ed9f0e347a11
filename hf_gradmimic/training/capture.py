"""Autograd plumbing: record every use of the mimic tensors in a forward, and start the backward at the logits.

`Capture` hooks the modules that hold mimic tensors around the training forward only, so recomputation
under activation checkpointing (which runs during backward) is not recorded twice. `Capture.ghost_batch`
takes ``δ = ∂root/∂z`` at every recorded output ``z`` in one ``autograd.grad`` and returns the
`hf_gradmimic.ghost.GhostBatch` the scorers read.

With the built-in losses, which read the model only through its logits ``z``, the backward of
``Σ_i c_i ℓ_i`` equals a backward started at ``z`` with ``c_i δ_i`` (``δ = ∂Σℓ/∂z``, needed for the
scores anyway): `BackwardFromLogits` does that, so the loss's own graph (a ``[B, T, vocab]`` log-softmax
for a language model) is differentiated once, as in plain `Trainer`.

When the logits are the output of a head ``z = W h + b`` (`HeadCut`: a language model's ``lm_head``) and a
mimic layer lies below it, the head's input ``h`` is a cut of the graph: every parameter but the head's own
reaches the loss through it. The backward that gives δ at the mimic layers then also gives ``∂Σℓ/∂h``, and the
weighted backward starts at ``h`` with ``c_i ∂ℓ_i/∂h_i`` (samples do not interact), the head's own gradient
``Σ_i c_i δ_iᵀ h_i`` formed from the recorded ``h`` and δ: the head (vocabulary-sized) is differentiated once
for both, and only the part between ``h`` and the mimic layers twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ghost import GhostBatch, LayerUse, UnsupportedLayerError, ghost_rule_for

GradientEdge = torch.autograd.graph.GradientEdge


@dataclass
class _Call:
    name: str
    module: nn.Module
    activations: torch.Tensor
    output: torch.Tensor | GradientEdge
    tensor_keys: dict[str, str]


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings()``: a language model's ``lm_head``) when the ghost maths
    covers it and it holds no sub-module (a LoRA-wrapped head does), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or next(head.children(), None) is not None:
        return None
    try:
        ghost_rule_for(head)
    except UnsupportedLayerError:
        return None
    return head


@dataclass
class HeadCut:
    """The output head ``z = f(h; W, b)`` whose output is the logits: its input ``h`` (part of the graph) and its
    trainable tensors, which a backward started at ``h`` does not reach."""

    module: nn.Module
    input: torch.Tensor
    params: dict[str, nn.Parameter]

    def weighted_grads(self, output_grads: torch.Tensor, coefficients: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The head's tensors' gradients for ``c_i δ_i`` at its output (``output_grads`` δ, ``coefficients`` c), in
        ``params`` order, each in its parameter's dtype: what the backward through the head would accumulate."""
        rule = ghost_rule_for(self.module)
        grads = rule.summed_gradient(self.module, self.input.detach(), output_grads, list(self.params), coefficients)
        return tuple(grads[local].to(param.dtype) for local, param in self.params.items())


class Capture:
    """Forward hooks recording, for one forward, each call of the hooked modules: its input and its output.

    Args:
        hooked: ``(name, module, tensor_keys)`` for every module holding a mimic tensor.
        layer_names: the named mimic layers (each must run in the forward).
        head: the model's output head (`output_head`), whose calls are recorded apart for `head_cut`, or None.
        grad_from_first_call: for a forward run under ``torch.no_grad``: autograd turns on when the first hooked
            module is called, so that the graph holds the mimic layers and what lies above them, and nothing below
            (δ at a mimic layer's output does not depend on what came before it). Grad mode is the caller's again
            when its ``torch.no_grad`` block ends.
    """

    def __init__(
        self,
        hooked: list[tuple[str, nn.Module, dict[str, str]]],
        layer_names: list[str],
        head: nn.Module | None = None,
        update_modules: list[nn.Module] | None = None,
        grad_from_first_call: bool = False,
    ) -> None:
        self.hooked = hooked
        self.grad_from_first_call = grad_from_first_call
        self.layer_names = layer_names
        self.head = head
        self.update_modules = update_modules or []
        self.batch_size: int | None = None  # the batch's samples, set before the forward
        self.update_calls: list[list[Any]] = []  # [module, input, output], for `hf_gradmimic.training.full_update`
        self.calls: list[_Call] = []
        self._head_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for name, module, keys in self.hooked:
            if self.grad_from_first_call:
                self._handles.append(module.register_forward_pre_hook(_grad_on))
            self._handles.append(module.register_forward_hook(self._hook(name, keys), with_kwargs=True))
        if self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._head_hook, with_kwargs=True))
        for module in self.update_modules:
            self._handles.append(module.register_forward_hook(self._update_hook, with_kwargs=True))
        return self

    def _update_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        layer_input = args[0] if args else next(iter(kwargs.values()))
        batch = self.batch_size
        shared_lookup = isinstance(module, nn.Embedding) and layer_input.shape[:1] == (1,)
        if batch and batch > 1 and shared_lookup and output.dim() and output.shape[0] == 1:
            # A lookup shared by the batch (position embeddings of [1, T] ids), whose output the model broadcasts
            # onto the batch: handed on broadcast to every sample, a view with the same values, so that δ at it is
            # per sample and can be weighted. Other modules' shared calls are handed on as they are (DeBERTa repeats
            # its relative embeddings' projections itself); their δ is not per sample and `ghost_and_update`
            # refuses them, which falls back to two backward passes.
            output = output.expand(batch, *output.shape[1:])
            self.update_calls.append([module, layer_input.detach().expand(batch, *layer_input.shape[1:]), output])
            return output
        self.update_calls.append([module, layer_input.detach(), output])
        return None

    def ghost_and_update(
        self, root: GradientEdge, root_grad: torch.Tensor, retain_graph: bool
    ) -> tuple[GhostBatch, list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]]]:
        """`ghost_batch` from the logits' edge, and ``(module, input, δ at its output)`` for every recorded call of
        the update modules (δ None where the call does not reach the loss), from one backward."""
        self.check_ran()
        known = {i: root_grad for i, call in enumerate(self.calls) if call.output is root}
        pending = [i for i in range(len(self.calls)) if i not in known]
        self.check_requires_grad([self.calls[i] for i in pending])
        updates = [i for i, call in enumerate(self.update_calls) if call[2] is not root and call[2].requires_grad]
        if any(self.update_calls[i][2].shape[:1] != root_grad.shape[:1] for i in updates):
            raise UnsupportedLayerError("a trainable module's output is not batch-first")
        found = torch.autograd.grad(
            root,
            [self.calls[i].output for i in pending] + [self.update_calls[i][2] for i in updates],
            grad_outputs=root_grad,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        mimic, update = found[: len(pending)], found[len(pending) :]
        self.check_used([self.calls[i] for i in pending], mimic)
        known.update(zip(pending, mimic))
        update_grads = dict(zip(updates, update))
        ghost = GhostBatch(
            [
                LayerUse(call.name, call.module, call.activations, known[i], call.tensor_keys)
                for i, call in enumerate(self.calls)
            ]
        )
        calls = [
            (module, activations, root_grad if output is root else update_grads.get(i))
            for i, (module, activations, output) in enumerate(self.update_calls)
        ]
        self.update_calls = []
        return ghost, calls

    def _head_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        self._head_calls.append((args[0] if args else next(iter(kwargs.values())), output))

    def head_cut(self, logits: torch.Tensor) -> HeadCut | None:
        """The output head as a cut of the graph when it ran once, its output *is* ``logits``, its input is part of
        the graph, and a recorded use of the mimic tensors lies below it (else there is nothing to save); None
        otherwise. Forgets the head's output either way (nothing keeps the logits alive)."""
        calls, self._head_calls = self._head_calls, []
        if len(calls) != 1 or calls[0][1] is not logits or not calls[0][0].requires_grad:
            return None
        if all(call.output is logits for call in self.calls):
            return None
        params = {local: param for local, param in self.head.named_parameters(recurse=False) if param.requires_grad}
        return HeadCut(self.head, calls[0][0], params)

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

    def input_of(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """The input of the recorded call whose output *is* ``logits`` (a classification head's features ``φ``), or
        None when no mimic layer makes the logits (or they are not known)."""
        if logits is None:
            return None
        return next((call.activations for call in self.calls if call.output is logits), None)

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
        for call in self.update_calls:
            if call[2] is logits:
                call[2] = edge
        return edge

    def check_ran(self) -> None:
        """Every named mimic layer ran in the forward, and every recorded call is on the batch (`check_batch_first`)."""
        ran = {call.name for call in self.calls}
        missing = [name for name in self.layer_names if name not in ran]
        if missing:
            raise RuntimeError(f"Mimic layer(s) {missing} did not run in the forward pass.")
        self.check_batch_first()

    def check_batch_first(self) -> None:
        """Every recorded call of a module holding mimic tensors takes one row per sample of the batch.

        The ghost maths reads row ``i`` of a call's input and output gradient as sample ``i``'s. A call on a tensor
        that the batch shares (DeBERTa's relative position embeddings through its key projection, a position
        embedding of ``[1, T]`` ids) has no per-sample rows: its ``[1, ...]`` result would be broadcast onto every
        sample, and the scores would be silently wrong. Refused, naming the layer and the shape."""
        if self.batch_size is None:
            return
        for call in self.calls:
            rows = call.activations.shape[0] if call.activations.dim() else None
            if rows != self.batch_size:
                raise UnsupportedLayerError(
                    f"Mimic layer {call.name!r} (or a module sharing its tensors) is called in the forward on a tensor "
                    f"of shape {tuple(call.activations.shape)}, which is not the batch of {self.batch_size} samples "
                    "(one row per sample first): a tensor the batch shares, such as DeBERTa's relative position "
                    "embeddings or a position embedding, or the samples spread over several rows each (a multiple-"
                    "choice model's choices). The rows of that call are not samples, so its per-sample gradient, and "
                    "the mimic score, are not defined by them. Pick a layer that processes one row per sample (a "
                    "head, an attention output or MLP projection); a multiple-choice model has none."
                )

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
        return self._ghost_and(root, root_grad, retain_graph, None)[0]

    def ghost_and_cut(
        self, root: GradientEdge, root_grad: torch.Tensor, cut: HeadCut
    ) -> tuple[GhostBatch, torch.Tensor]:
        """`ghost_batch` from the logits' edge, and ``∂root/∂h`` at the head's input ``h`` from the same backward
        (the graph kept for the weighted backward that starts at ``h``)."""
        ghost, cut_grad = self._ghost_and(root, root_grad, True, cut.input)
        if cut_grad is None:
            raise RuntimeError("The logits do not depend on the output head's input.")
        return ghost, cut_grad

    def _ghost_and(
        self,
        root: torch.Tensor | GradientEdge,
        root_grad: torch.Tensor | None,
        retain_graph: bool,
        extra: torch.Tensor | None,
    ) -> tuple[GhostBatch, torch.Tensor | None]:
        self.check_ran()
        grads: dict[int, torch.Tensor] = {i: root_grad for i, call in enumerate(self.calls) if call.output is root}
        pending = [i for i in range(len(self.calls)) if i not in grads]
        self.check_requires_grad([self.calls[i] for i in pending])
        extra_grad = None
        if pending or extra is not None:
            found = torch.autograd.grad(
                root,
                [self.calls[i].output for i in pending] + ([] if extra is None else [extra]),
                grad_outputs=root_grad,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            if extra is not None:
                *found, extra_grad = found
            self.check_used([self.calls[i] for i in pending], found)
            grads.update(zip(pending, found))
        ghost = GhostBatch(
            [
                LayerUse(call.name, call.module, call.activations, grads[i], call.tensor_keys)
                for i, call in enumerate(self.calls)
            ]
        )
        return ghost, extra_grad


def _grad_on(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook: autograd on from here to the end of the caller's ``torch.no_grad`` block."""
    torch.set_grad_enabled(True)  # called as a function, it sets the mode (returns a context manager, dropped here)


class PendingGrad:
    """The gradient at the logits (or the head's input) that `BackwardFromLogits` hands on, known only after the
    scores, and, for a `HeadCut`, a function giving the head's tensors' gradients (formed during the backward)."""

    grad: torch.Tensor | None = None
    param_grads: Any = None


class BackwardFromLogits(torch.autograd.Function):
    """A zero scalar whose backward hands ``pending.grad`` to ``output``: ``backward()`` of it starts at ``output``.

    When every parameter reaches the loss only through the logits z, ∂(Σ_i c_i ℓ_i)/∂z_i = c_i δ_i with
    δ = ∂Σℓ/∂z, which the scores needed anyway. The node is made right after the forward and the gradient set
    later, so that nothing has to keep the logits alive in between. The gradient is scaled in place by the
    upstream one and handed on once, as `Trainer` backpropagates. With ``params`` (a `HeadCut`'s tensors,
    ``output`` the head's input), ``pending.param_grads()`` gives their gradients, accumulated as autograd does.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, pending: PendingGrad, *params: torch.Tensor) -> torch.Tensor:
        ctx.pending = pending
        return output.new_zeros(())

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pending = ctx.pending
        grad, pending.grad = pending.grad, None
        if grad is None:
            raise RuntimeError("MimicTrainer's loss was backpropagated twice, or before its logits' gradient was set.")
        param_grads, pending.param_grads = pending.param_grads, None
        extra = () if param_grads is None else tuple(g.mul_(upstream) for g in param_grads())
        return grad.mul_(upstream), None, *extra


def scale_per_sample(tensor: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``tensor[i] * coefficients[i]``, in place when the layout allows (the tensor can be vocabulary-sized).
    The product is formed in the coefficients' float32 and rounded once to the tensor's dtype (bf16 logits)."""
    scale = coefficients.detach().view(-1, *([1] * (tensor.dim() - 1)))
    return tensor.mul_(scale) if tensor.is_contiguous() else (tensor * scale).to(tensor.dtype)
