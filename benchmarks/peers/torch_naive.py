"""Plain PyTorch one-token decode steps in rwkvops' conventions (the simplest correct GPU baseline)."""
import torch


def _decay(w):
    return torch.exp(-torch.exp(w.float()))


def wkv7_torch_step(x, state, requires_grad):
    r, w, k, v, a, b = (x[n][:, 0].float() for n in ("r", "w", "k", "v", "a", "b"))
    d = _decay(w)

    def fn():
        sa = torch.einsum("bhij,bhj->bhi", state, a)
        s = state * d[:, :, None, :] + sa[..., None] * b[:, :, None, :] + v[..., None] * k[:, :, None, :]
        y = torch.einsum("bhij,bhj->bhi", s, r)
        return y[:, None].to(x["r"].dtype), s
    return fn


def wkv6_torch_step(x, state, requires_grad):
    r, k, v, w = (x[n][:, 0].float() for n in ("r", "k", "v", "w"))
    u = x["u"].float()
    d = _decay(w)

    def fn():
        kv = v[..., None] * k[:, :, None, :]
        y = torch.einsum("bhij,bhj->bhi", state + u[None, :, None, :] * kv, r)
        s = state * d[:, :, None, :] + kv
        return y[:, None].to(x["r"].dtype), s
    return fn
