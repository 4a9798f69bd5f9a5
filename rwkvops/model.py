"""A small random-weight RWKV-7 language model on top of :func:`rwkvops.wkv7`: GPT mode, RNN mode and serving.

The model follows the public RWKV-7 ("x070") formulas (see ``seeds/001`` beside DESIGN.md): per layer a time mix
(token shift, r/k/v/w/a/g projections with the low-rank decay, in-context learning rate, value-residual and gate
paths, ``kk`` normalisation, the WKV state update through ``rwkvops.wkv7`` with ``a = -kk``, ``b = kk * lr``,
a group norm per head, the ``r_k`` bonus term and the output gate) and a channel mix (token shift, relu^2).
Weights are random (seeded); the model exists to exercise the op the way a real model does and to check that the
serving paths agree with each other.  Everything except the WKV recurrence is plain array code written against a
tiny namespace shim, so the same model runs on NumPy, CuPy and torch (CPU or CUDA) arrays.

Three ways to run it, which must agree:

* GPT mode, :meth:`RWKV7Model.forward`: ``tokens [B, T] -> logits [B, T, V]``, one ``wkv7`` call per layer for the
  whole sequence (prefill, training-style).
* RNN mode, :meth:`RWKV7Model.step`: ``tokens [B] -> logits [B, V]`` with a carried :class:`State` (decode).
* Serving, :meth:`RWKV7Model.forward_packed`: prefill chunks and decode tokens of many sequences packed along T
  (``cu_seqlens``), their states living in a pool (:meth:`RWKV7Model.new_pool`) addressed by slot
  (``state_indices``; slot ``-1``: start from zero, write nothing back).  One ``wkv7`` call per layer for the whole
  mixed batch; the WKV states are updated in place by the op, the two small token-shift arrays per layer are
  gathered and scattered here.

The carried state of one sequence is, per layer: the time-mix shift token ``[C]`` (the last input of the time
mix), the WKV state ``[H, N, N]`` (fp32, or float64 on the CPU for float64 models) and the channel-mix shift token
``[C]``.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

__all__ = ["RWKV7Model", "State", "Backend", "demo_model", "demo_results"]


# ----------------------------------------------------------------------------------------------- namespace shim

class Backend:
    """The few array operations the model needs, for NumPy, CuPy or torch (one device).

    ``kind`` is ``"numpy"``, ``"cupy"`` or ``"torch"``; ``device`` is a torch device string (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``) for torch, ignored otherwise.
    """

    def __init__(self, kind: str, device=None):
        if kind not in ("numpy", "cupy", "torch"):
            raise ValueError(f"Backend: kind must be 'numpy', 'cupy' or 'torch', got {kind!r}")
        self.kind = kind
        if kind == "numpy":
            self.m = np
            self.device = "cpu"
        elif kind == "cupy":
            import cupy
            self.m = cupy
            self.device = "cuda"
        else:
            import torch
            self.m = torch
            self.device = str(torch.device(device or "cpu"))

    @classmethod
    def resolve(cls, xp=None, device=None) -> "Backend":
        """``xp``: a Backend, the module numpy / cupy / torch, or one of the names ``"numpy"``, ``"cupy"``,
        ``"torch"`` (torch on ``device``, default CPU)."""
        if isinstance(xp, Backend):
            return xp
        if xp is None:
            return cls("numpy")
        name = xp if isinstance(xp, str) else getattr(xp, "__name__", "")
        if name in ("numpy", "np"):
            return cls("numpy")
        if name in ("cupy", "cp"):
            return cls("cupy")
        if name == "torch":
            return cls("torch", device)
        if name in ("torch-cuda", "torch_cuda"):
            return cls("torch", device or "cuda")
        raise ValueError(f"Backend: unknown array namespace {xp!r}; use numpy, cupy or torch")

    @property
    def gpu(self) -> bool:
        return self.kind == "cupy" or (self.kind == "torch" and self.device.startswith("cuda"))

    def __repr__(self):
        return f"Backend({self.kind!r}, {self.device!r})"

    # dtypes and conversion
    def dtype(self, name: str):
        return getattr(self.m, name) if self.kind == "torch" else np.dtype(name)

    def asarray(self, a, dtype: str):
        """A host (NumPy) array as a backend array of ``dtype`` (a name)."""
        a = np.asarray(a)
        if self.kind == "numpy":
            return np.ascontiguousarray(a, dtype=dtype)
        if self.kind == "cupy":
            return self.m.asarray(a.astype(dtype))
        return self.m.as_tensor(np.ascontiguousarray(a, dtype=dtype), device=self.device)

    def ints(self, a, dtype: str = "int64"):
        """Integers (list, NumPy, or an array of this backend) as a backend int array."""
        if self.kind == "torch" and isinstance(a, self.m.Tensor):
            return a.to(device=self.device, dtype=getattr(self.m, dtype))
        if self.kind == "cupy" and isinstance(a, self.m.ndarray):
            return a.astype(dtype, copy=False)
        return self.asarray(np.asarray(a, dtype=np.int64), dtype)

    def to_numpy(self, a) -> np.ndarray:
        if self.kind == "torch":
            return a.detach().cpu().numpy()
        if self.kind == "cupy":
            return a.get()
        return np.asarray(a)

    def zeros(self, shape, dtype: str):
        if self.kind == "torch":
            return self.m.zeros(tuple(shape), dtype=self.dtype(dtype), device=self.device)
        return self.m.zeros(tuple(shape), dtype=dtype)

    def sync(self):
        if self.kind == "cupy":
            self.m.cuda.get_current_stream().synchronize()
        elif self.kind == "torch" and self.gpu:
            self.m.cuda.synchronize(self.device)

    # array ops (the rest is operators: + - * / ** @ and indexing, which all three share)
    def cat(self, xs, axis):
        return self.m.cat(xs, dim=axis) if self.kind == "torch" else self.m.concatenate(xs, axis=axis)

    def sum(self, x, axis=-1, keepdims=False):
        return x.sum(dim=axis, keepdim=keepdims) if self.kind == "torch" else x.sum(axis=axis, keepdims=keepdims)

    def mean(self, x, axis=-1, keepdims=False):
        return x.mean(dim=axis, keepdim=keepdims) if self.kind == "torch" else x.mean(axis=axis, keepdims=keepdims)

    def contiguous(self, x):
        return x.contiguous() if self.kind == "torch" else self.m.ascontiguousarray(x)

    def clamp_min(self, x, v):
        return x.clamp_min(v) if self.kind == "torch" else self.m.maximum(x, v)

    def exp(self, x):
        return self.m.exp(x)

    def tanh(self, x):
        return self.m.tanh(x)

    def sqrt(self, x):
        return self.m.sqrt(x)

    def relu(self, x):
        return self.clamp_min(x, 0.0)

    def sigmoid(self, x):
        return 1.0 / (1.0 + self.m.exp(-x))

    def softplus(self, x):
        # log(1 + e^x) without overflow
        return self.relu(x) + self.m.log1p(self.m.exp(-self.m.abs(x)))

    def argmax(self, x):
        return x.argmax(-1)


def _layer_norm(be, x, w, b, eps=1e-5):
    mu = be.mean(x, -1, keepdims=True)
    xc = x - mu
    var = be.mean(xc * xc, -1, keepdims=True)
    return xc / be.sqrt(var + eps) * w + b


def _wkv7():
    import rwkvops
    return rwkvops.wkv7


# ----------------------------------------------------------------------------------------------- state

@dataclasses.dataclass
class State:
    """Carried state of ``B`` sequences (or a pool of ``B`` slots), per layer.

    att_x[l]: ``[B, C]`` time-mix shift token; wkv[l]: ``[B, H, N, N]`` WKV state ``S[b, h, value, key]``;
    ffn_x[l]: ``[B, C]`` channel-mix shift token.
    """

    att_x: list
    wkv: list
    ffn_x: list

    @property
    def size(self) -> int:
        return int(self.wkv[0].shape[0])

    def copy(self) -> "State":
        cp = (lambda a: a.clone()) if hasattr(self.wkv[0], "clone") else (lambda a: a.copy())
        return State([cp(a) for a in self.att_x], [cp(a) for a in self.wkv], [cp(a) for a in self.ffn_x])

    def gather(self, be: Backend, slots) -> "State":
        """The states in ``slots`` (slot -1: zeros) as a new dense State of ``len(slots)`` sequences."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        keep = np.nonzero(slots >= 0)[0]
        src, dst = be.ints(slots[keep]), be.ints(keep)

        def g(a):
            out = be.zeros((len(slots),) + tuple(a.shape[1:]), _dtype_name(a))
            if keep.size:
                out[dst] = a[src]
            return out
        return State([g(a) for a in self.att_x], [g(a) for a in self.wkv], [g(a) for a in self.ffn_x])

    def scatter(self, be: Backend, slots, other: "State") -> None:
        """Write the dense ``other`` (one sequence per entry of ``slots``) into ``slots`` of this pool, in place;
        entries with slot -1 are skipped."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        keep = np.nonzero(slots >= 0)[0]
        if not keep.size:
            return
        dst, src = be.ints(slots[keep]), be.ints(keep)
        for mine, theirs in ((self.att_x, other.att_x), (self.wkv, other.wkv), (self.ffn_x, other.ffn_x)):
            for a, b in zip(mine, theirs):
                a[dst] = b[src]

    def reset(self, be: Backend, slots) -> None:
        """Zero ``slots`` in place (a new sequence starts there)."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        slots = slots[slots >= 0]
        if not slots.size:
            return
        idx = be.ints(slots)
        for group in (self.att_x, self.wkv, self.ffn_x):
            for a in group:
                a[idx] = 0


def _dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------- the model

class RWKV7Model:
    """A random-weight RWKV-7 language model; see the module docstring.

    Build one with :meth:`random`.  ``dtype`` is the activation/weight dtype (``"float32"`` or ``"float64"``; the
    GPU path of ``wkv7`` takes float32).  WKV states are fp32 (float64 for a float64 model on the CPU).
    """

    def __init__(self, params: dict, *, n_layer, n_embd, head_size, vocab, backend: Backend, dtype: str):
        self.p = params
        self.n_layer, self.n_embd, self.head_size, self.vocab = n_layer, n_embd, head_size, vocab
        self.n_head = n_embd // head_size
        self.be = backend
        self.dtype = dtype
        self.state_dtype = "float64" if (dtype == "float64" and not backend.gpu) else "float32"

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, n_layer=2, n_embd=128, head_size=32, vocab=256, seed=0, xp=np, dtype="float32", device=None,
               d_decay=None, d_lr=None, d_value=None, d_gate=None) -> "RWKV7Model":
        """Random weights (seeded, drawn in float64 on the host so every backend gets the same model)."""
        dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        if dtype not in ("float32", "float64"):
            raise ValueError(f"RWKV7Model.random: dtype must be float32 or float64, got {dtype}")
        if n_embd % head_size:
            raise ValueError(f"RWKV7Model.random: n_embd={n_embd} is not a multiple of head_size={head_size}")
        be = Backend.resolve(xp, device)
        C, H, N = n_embd, n_embd // head_size, head_size
        d_decay = d_decay or max(8, C // 16)
        d_lr = d_lr or max(8, C // 16)
        d_value = d_value or max(8, C // 32)
        d_gate = d_gate or max(16, C // 8)
        rng = np.random.default_rng(seed)

        def nrm(*shape, scale=1.0):
            return rng.standard_normal(shape) * scale

        def unif(*shape, lo=0.0, hi=1.0):
            return rng.uniform(lo, hi, shape)

        P = {"emb": nrm(vocab, C), "ln0_w": 1 + nrm(C, scale=0.1), "ln0_b": nrm(C, scale=0.1),
             "lnout_w": 1 + nrm(C, scale=0.1), "lnout_b": nrm(C, scale=0.1),
             "head": nrm(C, vocab, scale=3 / math.sqrt(C))}
        for l in range(n_layer):
            L = {
                "ln1_w": 1 + nrm(C, scale=0.1), "ln1_b": nrm(C, scale=0.1),
                "ln2_w": 1 + nrm(C, scale=0.1), "ln2_b": nrm(C, scale=0.1),
                # time mix
                **{f"x_{c}": unif(C) for c in "rwkvag"},
                "Wr": nrm(C, C, scale=1 / math.sqrt(C)), "Wk": nrm(C, C, scale=1 / math.sqrt(C)),
                "Wv": nrm(C, C, scale=1 / math.sqrt(C)), "Wo": nrm(C, C, scale=0.5 / math.sqrt(C)),
                "w0": unif(C, lo=-6.0, hi=1.0), "w1": nrm(C, d_decay, scale=1 / math.sqrt(C)),
                "w2": nrm(d_decay, C, scale=0.5 / math.sqrt(d_decay)),
                "a0": nrm(C, scale=0.5), "a1": nrm(C, d_lr, scale=1 / math.sqrt(C)),
                "a2": nrm(d_lr, C, scale=1 / math.sqrt(d_lr)),
                "g1": nrm(C, d_gate, scale=1 / math.sqrt(C)), "g2": nrm(d_gate, C, scale=1 / math.sqrt(d_gate)),
                "k_k": 0.85 + nrm(C, scale=0.1), "k_a": 1 + nrm(C, scale=0.1), "r_k": nrm(H, N, scale=0.3),
                "lnx_w": 1 + nrm(C, scale=0.1), "lnx_b": nrm(C, scale=0.1),
                # channel mix
                "f_xk": unif(C), "fWk": nrm(C, 4 * C, scale=1 / math.sqrt(C)),
                "fWv": nrm(4 * C, C, scale=0.5 / math.sqrt(4 * C)),
            }
            if l > 0:  # value residual (layers after the first mix in the first layer's v)
                L.update({"v0": nrm(C, scale=0.5), "v1": nrm(C, d_value, scale=1 / math.sqrt(C)),
                          "v2": nrm(d_value, C, scale=1 / math.sqrt(d_value))})
            for k, v in L.items():
                P[f"{l}.{k}"] = v
        params = {k: be.asarray(v, dtype) for k, v in P.items()}
        return cls(params, n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab=vocab, backend=be,
                   dtype=dtype)

    # ------------------------------------------------------------------ states and pools
    def zero_state(self, batch: int) -> State:
        """Zero state for ``batch`` sequences (the start of a sequence)."""
        be, C, H, N, L = self.be, self.n_embd, self.n_head, self.head_size, self.n_layer
        return State([be.zeros((batch, C), self.dtype) for _ in range(L)],
                     [be.zeros((batch, H, N, N), self.state_dtype) for _ in range(L)],
                     [be.zeros((batch, C), self.dtype) for _ in range(L)])

    def new_pool(self, P: int) -> State:
        """A pool of ``P`` state slots (all zero) for :meth:`forward_packed`."""
        return self.zero_state(P)

    # ------------------------------------------------------------------ blocks
    def _tokens(self, tokens):
        return self.be.ints(tokens)

    def _time_mix(self, l, x, x_prev, v_first, wkv):
        """x, x_prev: ``[..., C]``; ``wkv(r, w, k, v, a, b)`` on ``[..., H, N]`` arrays returns y ``[..., H, N]``."""
        be, p = self.be, self.p
        g_ = lambda name: p[f"{l}.{name}"]  # noqa: E731
        lead = tuple(x.shape[:-1])
        H, N, C = self.n_head, self.head_size, self.n_embd
        xx = x_prev - x
        xr, xw, xk = x + xx * g_("x_r"), x + xx * g_("x_w"), x + xx * g_("x_k")
        xv, xa, xg = x + xx * g_("x_v"), x + xx * g_("x_a"), x + xx * g_("x_g")
        r = xr @ g_("Wr")
        w = -be.softplus(-(g_("w0") + be.tanh(xw @ g_("w1")) @ g_("w2"))) - 0.5   # raw decay: exp(-exp(w))
        k = xk @ g_("Wk")
        v = xv @ g_("Wv")
        if l == 0:
            v_first = v
        else:
            v = v + (v_first - v) * be.sigmoid(g_("v0") + (xv @ g_("v1")) @ g_("v2"))
        a = be.sigmoid(g_("a0") + (xa @ g_("a1")) @ g_("a2"))       # in-context learning rate
        g = be.sigmoid(xg @ g_("g1")) @ g_("g2")
        kk = (k * g_("k_k")).reshape(lead + (H, N))
        kk = kk / be.clamp_min(be.sqrt(be.sum(kk * kk, -1, keepdims=True)), 1e-12)
        k = k * (1 + (a - 1) * g_("k_a"))
        hs = lead + (H, N)
        ah = a.reshape(hs)
        y = wkv(be.contiguous(r.reshape(hs)), be.contiguous(w.reshape(hs)), be.contiguous(k.reshape(hs)),
                be.contiguous(v.reshape(hs)), be.contiguous(-kk), be.contiguous(kk * ah))
        # group norm per head
        mu = be.mean(y, -1, keepdims=True)
        yc = y - mu
        y = yc / be.sqrt(be.mean(yc * yc, -1, keepdims=True) + 64e-5)
        y = y.reshape(lead + (C,)) * g_("lnx_w") + g_("lnx_b")
        bonus = be.sum(r.reshape(hs) * k.reshape(hs) * g_("r_k"), -1, keepdims=True) * v.reshape(hs)
        y = y + bonus.reshape(lead + (C,))
        return (y * g) @ g_("Wo"), v_first

    def _channel_mix(self, l, x, x_prev):
        be, p = self.be, self.p
        k = x + (x_prev - x) * p[f"{l}.f_xk"]
        k = be.relu(k @ p[f"{l}.fWk"])
        return (k * k) @ p[f"{l}.fWv"]

    def _head(self, x):
        p = self.p
        return _layer_norm(self.be, x, p["lnout_w"], p["lnout_b"]) @ p["head"]

    def _embed(self, tokens):
        p = self.p
        return _layer_norm(self.be, p["emb"][tokens], p["ln0_w"], p["ln0_b"])

    # ------------------------------------------------------------------ GPT mode
    def forward(self, tokens, state: State | None = None, *, mask=None, last_only: bool = False):
        """GPT mode: ``tokens [B, T]`` (T >= 1) from ``state`` (None: zeros) -> ``(logits, state_out)``.

        ``logits`` is ``[B, T, V]`` (``[B, V]`` for the last position with ``last_only``).  ``state`` is not
        modified.  ``mask [B, T]`` (1 = token, 0 = padding) is for LEFT-padded batches starting from a zero
        state: padding positions feed exact zeros into every time/channel mix, so the WKV state and the shift
        tokens stay zero through them and each row gives what it would give alone.
        """
        be, wkv7 = self.be, _wkv7()
        tokens = self._tokens(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"RWKV7Model.forward: tokens must be [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
        B, T = int(tokens.shape[0]), int(tokens.shape[1])
        if state is None:
            state = self.zero_state(B)
        m = None
        if mask is not None:
            host = mask if isinstance(mask, (list, tuple, np.ndarray)) else be.to_numpy(mask)
            m = be.asarray(np.asarray(host, dtype=np.float64).reshape(B, T, 1), self.dtype)
        out = State([], [], [])
        x = self._embed(tokens)                                  # [B, T, C]
        v_first = None
        for l in range(self.n_layer):
            p = self.p
            xa = _layer_norm(be, x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"])
            if m is not None:
                xa = xa * m
            prev = be.cat([state.att_x[l][:, None], xa[:, :-1]], 1)

            def wkv(r, w, k, v, a, b, _l=l):
                y, s = wkv7(r, w, k, v, a, b, state=state.wkv[_l])
                out.wkv.append(s)
                return y
            dx, v_first = self._time_mix(l, xa, prev, v_first, wkv)
            x = x + dx
            xf = _layer_norm(be, x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"])
            if m is not None:
                xf = xf * m
            prev = be.cat([state.ffn_x[l][:, None], xf[:, :-1]], 1)
            x = x + self._channel_mix(l, xf, prev)
            out.att_x.append(be.contiguous(xa[:, -1]))
            out.ffn_x.append(be.contiguous(xf[:, -1]))
        if last_only:
            x = x[:, -1]
        return self._head(x), out

    # ------------------------------------------------------------------ RNN mode
    def step(self, tokens, state: State):
        """RNN mode: one token per sequence, ``tokens [B]`` -> ``(logits [B, V], state_out)``; ``state`` is not
        modified."""
        be, wkv7 = self.be, _wkv7()
        tokens = self._tokens(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"RWKV7Model.step: tokens must be [B], got shape {tuple(tokens.shape)}")
        B = int(tokens.shape[0])
        H, N = self.n_head, self.head_size
        out = State([], [], [])
        x = self._embed(tokens)                                  # [B, C]
        v_first = None
        for l in range(self.n_layer):
            p = self.p
            xa = _layer_norm(be, x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"])

            def wkv(r, w, k, v, a, b, _l=l):
                y, s = wkv7(*(t.reshape(B, 1, H, N) for t in (r, w, k, v, a, b)), state=state.wkv[_l])
                out.wkv.append(s)
                return y.reshape(B, H, N)
            dx, v_first = self._time_mix(l, xa, state.att_x[l], v_first, wkv)
            x = x + dx
            xf = _layer_norm(be, x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"])
            x = x + self._channel_mix(l, xf, state.ffn_x[l])
            out.att_x.append(xa)
            out.ffn_x.append(xf)
        return self._head(x), out

    # ------------------------------------------------------------------ serving: packed sequences over a pool
    def forward_packed(self, tokens, cu_seqlens, pool: State, slots, *, last_only: bool = False):
        """Run many sequences' next pieces (prefill chunks, single decode tokens) in one pass.

        ``tokens [Ttot]``: the pieces packed back to back; ``cu_seqlens [S + 1]`` (host ints, non-decreasing from 0
        to Ttot; zero-length pieces are allowed and leave their slot unchanged); ``slots [S]``: the pool slot of
        each sequence (distinct; -1: start from a zero state and write nothing back).  Each sequence starts from
        its slot's state and its slot holds the state after its piece when this returns (updated in place: one
        ``wkv7`` call per layer with ``cu_seqlens`` and ``state_indices`` for the WKV states; the shift tokens are
        gathered and scattered here).  Returns ``logits [Ttot, V]``, or with ``last_only`` ``[S, V]`` for each
        sequence's last token (zeros for a zero-length piece).
        """
        be, wkv7 = self.be, _wkv7()
        cu = np.asarray(cu_seqlens.get() if hasattr(cu_seqlens, "get") else
                        (cu_seqlens.cpu().numpy() if hasattr(cu_seqlens, "cpu") else cu_seqlens)).astype(np.int64)
        sl = np.asarray(slots.get() if hasattr(slots, "get") else
                        (slots.cpu().numpy() if hasattr(slots, "cpu") else slots)).astype(np.int64).reshape(-1)
        tokens = self._tokens(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"forward_packed: 'tokens' must be 1-D [Ttot], got shape {tuple(tokens.shape)}")
        T = int(tokens.shape[0])
        if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
            raise ValueError(f"forward_packed: 'cu_seqlens' must be non-decreasing from 0 to Ttot={T}, "
                             f"got {cu.tolist()[:8]}")
        S, P = cu.size - 1, pool.size
        if sl.shape != (S,):
            raise ValueError(f"forward_packed: 'slots' must have one entry per sequence ({S}), got {sl.shape}")
        if np.any((sl < -1) | (sl >= P)):
            raise ValueError(f"forward_packed: 'slots' must lie in [-1, {P}), got {sl.tolist()[:8]}")
        used = sl[sl >= 0]
        if np.unique(used).size != used.size:
            raise ValueError("forward_packed: 'slots' repeats a slot; each sequence needs its own")
        V = self.vocab
        if T == 0:
            return be.zeros((S if last_only else 0, V), self.dtype)
        starts, ends = cu[:-1], cu[1:]
        ne = ends > starts
        live = ne & (sl >= 0)
        first_pool, first_zero = be.ints(starts[live]), be.ints(starts[ne & (sl < 0)])
        last_pos, live_slots = be.ints(ends[live] - 1), be.ints(sl[live])
        n_live, n_zero = int(live.sum()), int((ne & (sl < 0)).sum())
        if be.gpu:  # upload once per call, not once per layer (validated on the host above)
            cu_arg, idx_arg = be.ints(cu, "int32"), be.ints(sl, "int32")
        else:
            cu_arg, idx_arg = cu.astype(np.int32), sl.astype(np.int32)
        H, N = self.n_head, self.head_size

        def shifted(xs, saved):
            prev = be.cat([be.zeros((1, xs.shape[1]), self.dtype), xs[:-1]], 0)
            if n_zero:
                prev[first_zero] = 0
            if n_live:
                prev[first_pool] = saved[live_slots]
            return prev

        x = self._embed(tokens)                                  # [Ttot, C]
        v_first = None
        for l in range(self.n_layer):
            p = self.p
            xa = _layer_norm(be, x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"])
            prev = shifted(xa, pool.att_x[l])

            def wkv(r, w, k, v, a, b, _l=l):
                y, _ = wkv7(*(t.reshape(1, T, H, N) for t in (r, w, k, v, a, b)), state=pool.wkv[_l],
                            cu_seqlens=cu_arg, state_indices=idx_arg)
                return y.reshape(T, H, N)
            dx, v_first = self._time_mix(l, xa, prev, v_first, wkv)
            if n_live:
                pool.att_x[l][live_slots] = xa[last_pos]
            x = x + dx
            xf = _layer_norm(be, x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"])
            prev = shifted(xf, pool.ffn_x[l])
            x = x + self._channel_mix(l, xf, prev)
            if n_live:
                pool.ffn_x[l][live_slots] = xf[last_pos]
        if not last_only:
            return self._head(x)
        out = be.zeros((S, V), self.dtype)
        rows = np.nonzero(ne)[0]
        if rows.size:
            out[be.ints(rows)] = self._head(x[be.ints(ends[ne] - 1)])
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, n_new: int, *, mode: str = "fast", return_logits: bool = False):
        """Greedy generation of ``n_new`` tokens after ``prompt [B, T]`` (same length for every row).

        ``mode``: ``"gpt"`` re-runs the whole sequence in GPT mode for every new token (no state carried);
        ``"rnn"`` feeds the prompt one token at a time with :meth:`step`; ``"fast"`` prefills the prompt with one
        :meth:`forward` and decodes with :meth:`step`.  Returns the new tokens as a NumPy ``[B, n_new]`` int64
        array (and the logits ``[B, n_new, V]`` that chose them, as a NumPy array, with ``return_logits``).
        """
        be = self.be
        prompt = np.asarray(self.be.to_numpy(prompt) if not isinstance(prompt, (list, np.ndarray)) else prompt,
                            dtype=np.int64)
        if prompt.ndim == 1:
            prompt = prompt[None]
        B, T = prompt.shape
        toks, logs = [], []
        if mode == "gpt":
            seq = prompt
            for _ in range(n_new):
                logits, _ = self.forward(seq, last_only=True)
                nxt = be.to_numpy(be.argmax(logits))
                toks.append(nxt)
                if return_logits:
                    logs.append(be.to_numpy(logits))
                seq = np.concatenate([seq, nxt[:, None]], 1)
        elif mode in ("rnn", "fast"):
            if mode == "rnn":
                state = self.zero_state(B)
                for t in range(T):
                    logits, state = self.step(prompt[:, t], state)
            else:
                logits, state = self.forward(prompt, last_only=True)
            for i in range(n_new):
                nxt = be.argmax(logits)
                toks.append(be.to_numpy(nxt))
                if return_logits:
                    logs.append(be.to_numpy(logits))
                if i + 1 < n_new:
                    logits, state = self.step(nxt, state)
        else:
            raise ValueError(f"generate: mode must be 'gpt', 'rnn' or 'fast', got {mode!r}")
        tokens = np.stack(toks, 1) if toks else np.zeros((B, 0), np.int64)
        if return_logits:
            return tokens, (np.stack(logs, 1) if logs else np.zeros((B, 0, self.vocab)))
        return tokens


# ----------------------------------------------------------------------------------------------- demo

def demo_results(xp=None, *, gpu=None, device=None, n_layer=2, n_embd=128, head_size=32, vocab=256, batch=4,
                 prompt_len=32, n_new=32, dtype="float32", seed=0, tol=None, out=print) -> dict:
    """Generate from the random model in GPT mode, RNN mode and prefill+RNN ("fast"); print whether they agree
    and their tokens/s; return the figures (``"ok"``: the modes agree).

    ``xp``: numpy, cupy, torch (with ``device``) or a name; default CuPy when ``gpu`` is true, else NumPy.
    Agreement: up to the first generated token where a mode differs from GPT mode (if any), the logits agree to
    ``tol`` * rms(logits) (default 1e-3 for float32, 1e-9 for float64), and a differing token is a near tie of
    the GPT-mode logits (within the same tolerance).
    """
    if xp is None:
        xp = "cupy" if gpu else "numpy"
    tol = tol if tol is not None else (1e-9 if dtype == "float64" else 1e-3)
    model = RWKV7Model.random(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab=vocab, seed=seed, xp=xp,
                              dtype=dtype, device=device)
    be = model.be
    prompt = np.random.default_rng(seed + 1).integers(0, vocab, (batch, prompt_len))
    res = {"backend": repr(be), "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "n_new": n_new,
           "model": dict(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab=vocab)}
    outs = {}
    model.generate(prompt[:, :2], 2, mode="fast")   # warm-up (kernel compile, allocator)
    out(f"[rwkvops demo] random RWKV-7 model L={n_layer} C={n_embd} N={head_size} V={vocab} on {be}, {dtype}; "
        f"greedy generation of {n_new} tokens after {batch} prompts of {prompt_len}")
    for mode in ("gpt", "rnn", "fast"):
        be.sync()
        t0 = time.perf_counter()
        toks, logits = model.generate(prompt, n_new, mode=mode, return_logits=True)
        be.sync()
        dt = time.perf_counter() - t0
        outs[mode] = (toks, logits.astype(np.float64))
        processed = batch * (prompt_len + n_new)
        res[f"{mode}_s"] = dt
        res[f"{mode}_tokens_per_s"] = processed / dt
        out(f"[rwkvops demo] {mode:>4} mode: {dt:.3f} s = {processed / dt:,.0f} tokens/s "
            f"({batch * n_new / dt:,.0f} generated tokens/s)")
    ref_t, ref_l = outs["gpt"]
    scale = float(np.sqrt(np.mean(ref_l ** 2))) or 1.0
    ok = True
    for mode in ("rnn", "fast"):
        t, lg = outs[mode]
        err, bad = 0.0, 0
        for b in range(batch):
            diff = np.nonzero(t[b] != ref_t[b])[0]
            upto = int(diff[0]) + 1 if diff.size else n_new        # same context up to the first divergence
            if upto:
                err = max(err, float(np.max(np.abs(lg[b, :upto] - ref_l[b, :upto]))) / scale)
            if diff.size:
                j = int(diff[0])
                gap = (ref_l[b, j, ref_t[b, j]] - ref_l[b, j, t[b, j]]) / scale
                bad += gap > tol
        same = float(np.mean(t == ref_t))
        good = err <= tol and not bad
        ok &= good
        res[f"{mode}_token_agreement"] = same
        res[f"{mode}_max_logit_err"] = err
        out(f"[rwkvops demo] {mode} vs gpt: {'agree' if good else 'DISAGREE'}: {100 * same:.1f}% of generated tokens "
            f"equal, max |logit diff| / rms(logits) = {err:.2e} (tolerance {tol:g})")
    res["ok"] = bool(ok)
    return res


def demo_model(xp=None, *, gpu=None, **kw) -> int:
    """The model demo of ``python -m rwkvops demo`` (see :func:`demo_results` for the arguments): prints
    tokens/s of GPT, RNN and prefill+RNN generation and whether they agree; returns 0 when they do, else 1."""
    return 0 if demo_results(xp, gpu=gpu, **kw)["ok"] else 1


if __name__ == "__main__":   # python -m rwkvops.model [numpy|cupy|torch|torch-cuda]
    import sys
    _xp = sys.argv[1] if len(sys.argv) > 1 else "numpy"
    sys.exit(demo_model(_xp, device="cuda" if _xp == "torch-cuda" else None))
