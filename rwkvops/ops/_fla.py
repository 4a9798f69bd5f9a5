"""flash-linear-attention's conventions, shared by the ops' converters.

fla takes the log decay ``-exp(w)`` where we take the raw ``w`` (decay ``exp(-exp(w))``), and keeps the state as
``[..., K, V]`` where ours is ``[..., V(i), K(j)]``.  These work on NumPy, CuPy and torch arrays; 16-bit inputs
are computed in fp32 and returned in their own dtype.
"""
import sys

import numpy as np


def _is_torch(x):
    t = sys.modules.get("torch")
    return t is not None and isinstance(x, t.Tensor)


def _apply(fn_name, x):
    if _is_torch(x):
        up = x.float() if x.element_size() < 4 else x
        return getattr(up, fn_name)().to(x.dtype)
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    if x.dtype.kind == "f" and x.dtype.itemsize < 4:
        return getattr(xp, fn_name)(x.astype(np.float32)).astype(x.dtype)
    return getattr(xp, fn_name)(x)


def log_decay(w):
    """Our raw ``w`` as fla's log decay ``-exp(w)``."""
    return -_apply("exp", w)


def raw_decay(g):
    """fla's log decay ``g`` (< 0) as our raw ``w = log(-g)``."""
    return _apply("log", -g)


def transpose_state(s):
    """Swap the last two axes (ours <-> fla's state layout), as a contiguous array; None stays None."""
    if s is None:
        return None
    if _is_torch(s):
        return s.transpose(-1, -2).contiguous()
    xp = np if isinstance(s, np.ndarray) else __import__("cupy")
    return xp.ascontiguousarray(xp.swapaxes(s, -1, -2))
