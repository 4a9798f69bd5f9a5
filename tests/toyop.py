"""A tiny op used to test the plumbing independently of the built-in ops (CPU reference only).

S_t = S_{t-1} * exp(-exp(w_t)) + x_t ;  y_t = S_t * g      (elementwise over [H, N]; g is [H, N], shared)
"""
import numpy as np

from rwkvops import Arg, Op


def forward(x, state):
    xs, w, g = x["x"], x["w"], x["g"]
    d = np.exp(-np.exp(w))
    s = state.copy()
    y = np.empty_like(xs)
    for t in range(xs.shape[1]):
        s = s * d[:, t] + xs[:, t]
        y[:, t] = s * g
    return y, s


def backward(x, state, dy, dstate):
    xs, w, g = x["x"], x["w"], x["g"]
    d = np.exp(-np.exp(w))
    T = xs.shape[1]
    states = [state]
    for t in range(T):
        states.append(states[-1] * d[:, t] + xs[:, t])
    ds = dstate.copy()
    dx, dw, dg = np.zeros_like(xs), np.zeros_like(w), np.zeros_like(g)
    for t in reversed(range(T)):
        ds = ds + dy[:, t] * g
        dg += (dy[:, t] * states[t + 1]).sum(0)
        dx[:, t] = ds
        dw[:, t] = ds * states[t] * d[:, t] * -np.exp(w[:, t])
        ds = ds * d[:, t]
    return {"x": dx, "w": dw, "g": dg, "state": ds}


def make(name="toy_ema"):
    return Op(
        name=name,
        inputs=(Arg("x", ("B", "T", "H", "N")), Arg("w", ("B", "T", "H", "N")), Arg("g", ("H", "N"))),
        state=Arg("state", ("B", "H", "N")),
        output="x",
        reference_forward=forward,
        reference_backward=backward,
        reduce_batch=("g",),
    )
