"""flash-linear-attention's RWKV-6 as a benchmark peer, fed OUR inputs converted once (outside timing).

``inputs``: {"r","k","v","w","u"} torch CUDA tensors in rwkvops' convention (w raw: decay exp(-exp(w))),
``state``: fp32 [B, H, N(value), N(key)] or None.  Each factory returns a zero-argument function that runs
fla and returns ``(y, final_state)`` (final state in fla's [B, H, K, V] layout; the harness only times it
and back-propagates random gradients through it).  fla is imported lazily.
"""


def _convert(inputs, state, requires_grad):
    import torch
    from rwkvops.ops.wkv6 import to_fla
    with torch.no_grad():
        r, k, v, g, u, h0 = to_fla(inputs["r"], inputs["k"], inputs["v"], inputs["w"], inputs["u"], state)
        out = [t.detach().clone().contiguous() for t in (r, k, v, g, u)]
        h0 = None if h0 is None else h0.detach().clone().contiguous()
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
        if h0 is not None:
            h0.requires_grad_(True)
    return (*out, h0)


def fla(inputs: dict, state, requires_grad: bool):
    """fla's chunk_rwkv6 (scale=1, log decay -exp(w), transposed state)."""
    from fla.ops.rwkv6 import chunk_rwkv6
    r, k, v, g, u, h0 = _convert(inputs, state, requires_grad)

    def fn():
        return chunk_rwkv6(r, k, v, g, u, scale=1.0, initial_state=h0, output_final_state=True)
    return fn


def fla_recurrent(inputs: dict, state, requires_grad: bool):
    """fla's fused_recurrent_rwkv6 (used for one-token decode)."""
    from fla.ops.rwkv6 import fused_recurrent_rwkv6
    r, k, v, g, u, h0 = _convert(inputs, state, requires_grad)

    def fn():
        return fused_recurrent_rwkv6(r, k, v, g, u, scale=1.0, initial_state=h0, output_final_state=True)
    return fn
