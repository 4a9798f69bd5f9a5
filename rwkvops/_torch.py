"""torch.autograd for every op: one Function, generic over the op declaration."""
from __future__ import annotations

import torch

from ._dispatch import _forward, backward


class _OpFunction(torch.autograd.Function):
    @staticmethod
    def forward(fctx, op, plan, bridge, cu_seqlens, state_indices, n_inputs, *tensors):
        names = [a.name for a in op.inputs]
        x = dict(zip(names, tensors[:n_inputs]))
        state = tensors[n_inputs]
        y, s_out, ctx = _forward(op, plan, bridge, x, state, cu_seqlens, state_indices, save=True)
        fctx.ctx = ctx
        fctx.has_state = state is not None
        # The backward reads the inputs through zero-copy views; remember their versions so an in-place change
        # between forward and backward raises instead of giving silently wrong gradients.
        fctx.inputs = [t for t in tensors if t is not None]
        fctx.versions = [t._version for t in fctx.inputs]
        return y, s_out

    @staticmethod
    def backward(fctx, dy, dstate):
        ctx = fctx.ctx
        for t, v in zip(fctx.inputs, fctx.versions):
            if t._version != v:
                raise RuntimeError(f"{ctx.op.name}: an input of shape {tuple(t.shape)} was modified in place between "
                                   "forward and backward; its gradient would be wrong")
        grads = backward(ctx, dy, dstate)
        op = ctx.op
        out = [grads[a.name] for a in op.inputs]
        out.append(grads[op.state.name] if fctx.has_state else None)
        return (None,) * 6 + tuple(out)


def apply(op, plan, bridge, x, state, cu_seqlens, state_indices):
    return _OpFunction.apply(op, plan, bridge, cu_seqlens, state_indices, len(x), *x.values(), state)
