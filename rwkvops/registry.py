"""The op registry: one declaration per op, built-in and third-party alike.

An op is a :class:`Op`: its arguments with symbolic shapes, the dtypes and head sizes it supports, a NumPy
reference (forward and backward) and GPU launchers.  Built-in ops register themselves through
:func:`register_op` exactly as plugins do; plugins are discovered through the ``rwkvops.ops`` entry-point
group (each entry point names a callable or module that calls :func:`register_op` when loaded).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

from ._dispatch import call_op

__all__ = ["Arg", "Op", "Kernel", "register_op", "get_op", "list_ops"]

# Element types a kernel may be instantiated for, by the names used everywhere in the package.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Arg:
    """One array argument of an op.

    ``shape`` is a tuple of symbols (``"B"``, ``"T"``, ``"H"``, ``"N"``, ``"C"``) or fixed ints.  Arguments
    whose shape contains ``"T"`` are per-token: with ``cu_seqlens`` they are packed along T.  ``reduce_batch``
    marks parameters shared by the whole batch (``u`` of wkv6, ``w``/``u`` of wkv4): their gradient is summed.
    """

    name: str
    shape: tuple
    doc: str = ""

    @property
    def per_token(self) -> bool:
        return "T" in self.shape


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A CUDA source file and the template instantiations one op compiles from it."""

    source: str                       # file name under cuda_src/
    name_expressions: tuple           # e.g. ("wkv7_forward<float, 64>", ...)


@dataclasses.dataclass
class Op:
    """Declaration of a WKV-style op: ``op(*inputs, state=None, cu_seqlens=None, state_indices=None) -> (y, state)``.

    Fields
    ------
    name: public name (``"wkv7"``).
    inputs: the array arguments in call order (state excluded).
    state: the state argument; its leading symbol is the batch (or pool) dimension.
    output: the argument whose shape and dtype ``y`` takes.
    dtypes: input dtypes the GPU path supports (state is always float32).
    head_sizes: supported values of ``N`` (``None``: no head-size symbol).
    reference_forward(inputs: dict, state) -> (y, state_out): NumPy, dense batch, computes in the inputs'
        dtype (float32 or float64).  ``state`` is never None here.
    reference_backward(inputs: dict, state, dy, dstate) -> dict of gradients keyed by input name plus
        ``"state"``; same conventions.
    gpu_forward(inputs: dict, state_in, seqs, *, state_out, state_indices, save) -> (y, saved)
        launches kernels on CuPy arrays (see :mod:`rwkvops._gpu` for ``seqs``); writes the final states into
        ``state_out`` (which may alias ``state_in`` for a pool); ``saved`` is whatever backward needs.
    gpu_backward(inputs, state_in, seqs, saved, dy, dstate) -> dict of gradients, as reference_backward.
    kernels: every CUDA instantiation the op uses, for ``python -m rwkvops compile`` and the NVRTC check.
    sample_inputs(rng, dims, w_range) -> dict: realistic random float64 inputs for tests and benchmarks (default: standard
        normal, ``w`` uniform in [-8, 4]).
    """

    name: str
    inputs: Sequence[Arg]
    state: Arg
    output: str
    reference_forward: Callable
    reference_backward: Callable
    dtypes: tuple = FLOAT_DTYPES
    head_sizes: Optional[tuple] = None
    gpu_forward: Optional[Callable] = None
    gpu_backward: Optional[Callable] = None
    kernels: Sequence[Kernel] = ()
    reduce_batch: tuple = ()          # names of inputs shared across the batch (gradient summed)
    sample_inputs: Optional[Callable] = None  # (rng, dims, w_range) -> dict of float64 inputs in the valid range
    sample_state: Optional[Callable] = None   # (rng, dims, num) -> float64 [num, ...] valid initial states
    doc: str = ""

    def __post_init__(self):
        names = [a.name for a in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"op {self.name!r}: duplicate argument names {names}")
        if self.output not in names:
            raise ValueError(f"op {self.name!r}: output {self.output!r} is not one of its inputs {names}")
        bad = [d for d in self.dtypes if d not in FLOAT_DTYPES]
        if bad:
            raise ValueError(f"op {self.name!r}: unsupported dtypes {bad}; expected a subset of {FLOAT_DTYPES}")

    @functools.cached_property
    def input_names(self) -> tuple:
        """Names of the array inputs, in call order."""
        return tuple(a.name for a in self.inputs)

    def arg(self, name: str) -> Arg:
        for a in (*self.inputs, self.state):
            if a.name == name:
                return a
        raise KeyError(name)

    # ``op(*inputs, state=None, cu_seqlens=None, state_indices=None) -> (y, state_out)``: the dispatcher's function
    # itself is the method, so a call enters it directly (a forwarding method cost ~0.7 us per decode call)
    __call__ = call_op


_REGISTRY: dict = {}
_PLUGINS_LOADED = False


def register_op(op: Op, *, replace: bool = False) -> Op:
    """Add ``op`` to the registry and return it.  Registering a taken name raises unless ``replace``."""
    if not isinstance(op, Op):
        raise TypeError(f"register_op: expected an rwkvops.Op, got {type(op).__name__}")
    if op.name in _REGISTRY and not replace and _REGISTRY[op.name] is not op:
        raise ValueError(f"register_op: an op named {op.name!r} is already registered")
    _REGISTRY[op.name] = op
    return op


def _load_plugins() -> None:
    """Import the built-in ops and every ``rwkvops.ops`` entry point, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from . import ops  # noqa: F401  (built-ins register on import)
    from importlib.metadata import entry_points
    for ep in entry_points(group="rwkvops.ops"):
        if ep.value.split(":")[0].startswith("rwkvops.ops"):
            continue  # the built-ins, already imported above
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break the library
            import warnings
            warnings.warn(f"rwkvops: could not load plugin {ep.name!r} ({ep.value}): {exc!r}")
            continue
        if callable(obj) and not isinstance(obj, Op):
            obj = obj()
        if isinstance(obj, Op):
            register_op(obj, replace=True)


def get_op(name: str) -> Op:
    """The registered op called ``name``."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_ops() -> list:
    """Names of all registered ops, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)
