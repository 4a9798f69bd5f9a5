"""Peers of rwkvops' wkv7 for the benchmark harness: flash-linear-attention (fla) RWKV-7 kernels.

Each peer takes OUR inputs (torch CUDA tensors, dict with r, w, k, v, a, b of shape [B, T, H, N], our raw decay
``w``) and our state ([B, H, N(value), N(key)] fp32 or None), converts them once to fla's convention outside
the timed region (log decay ``-exp(w)``, state transposed to [B, H, K, V]) as fresh leaf tensors, and returns a
zero-argument function that runs fla's forward and returns ``(y, final_state)`` (final state in fla's layout).
fla is imported lazily, so this module imports without it.
"""
from __future__ import annotations


def _convert(inputs: dict, state, requires_grad: bool):
    from rwkvops.ops.wkv7 import to_fla
    g, h0 = to_fla(inputs["w"].detach(), None if state is None else state.detach())
    leaf = {n: inputs[n].detach().clone().contiguous() for n in ("r", "k", "v", "a", "b")}
    leaf["w"] = g.contiguous()
    for t in leaf.values():
        t.requires_grad_(requires_grad)
    if h0 is not None:
        h0 = h0.float().contiguous().requires_grad_(requires_grad)
    return leaf, h0


def fla(inputs: dict, state, requires_grad: bool):
    """fla's ``chunk_rwkv7`` (default chunking; scale 1.0), with our initial state (converted) if given."""
    from fla.ops.rwkv7 import chunk_rwkv7
    x, h0 = _convert(inputs, state, requires_grad)

    def run():
        return chunk_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0,
                           initial_state=h0, output_final_state=True)
    return run


def fla_recurrent(inputs: dict, state, requires_grad: bool):
    """fla's ``fused_recurrent_rwkv7`` (the peer for one-token decode); scale 1.0 (its default is 1/sqrt(K))."""
    from fla.ops.rwkv7 import fused_recurrent_rwkv7
    x, h0 = _convert(inputs, state, requires_grad)

    def run():
        return fused_recurrent_rwkv7(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], scale=1.0,
                                     initial_state=h0, output_final_state=True)
    return run
