"""Peer implementations of RWKV-4 WKV for the benchmark harness.

Each peer: ``peer(inputs, state, requires_grad) -> fn`` where ``inputs`` holds OUR torch CUDA tensors
(``w, u`` [C], ``k, v`` [B, T, C]) and ``state`` our ``[B, 3, C]`` fp32 state (or None).  The conversion to
the peer's convention happens here, once, outside the timed region; ``fn()`` runs the peer and returns
``(y, final_state)``.
"""
from __future__ import annotations


def fla(inputs: dict, state, requires_grad: bool):
    """flash-linear-attention's ``fused_recurrent_rwkv4`` (one program per (batch, channel block), serial in T).

    fla takes the same raw ``w`` (it applies ``-exp(w)`` itself) and a required state ``[B, 3, 1, C]`` with the
    same meaning as ours (alpha e^eps, beta e^eps); its state is kept in ``k``'s dtype.  Our empty state
    (None) is zeros in both conventions.
    """
    import torch
    from fla.ops.rwkv4.fused_recurrent import fused_recurrent_rwkv4

    k = inputs["k"]
    B, _, C = k.shape
    if state is None:
        state = torch.zeros(B, 3, C, device=k.device, dtype=torch.float32)
    args = [inputs[n].detach().clone().contiguous().requires_grad_(requires_grad) for n in ("w", "u", "k", "v")]
    s0 = state.detach()[:, :, None, :].to(k.dtype).contiguous().requires_grad_(requires_grad)

    def run():
        return fused_recurrent_rwkv4(*args, s0)

    return run
