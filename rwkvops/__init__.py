"""rwkvops: the RWKV WKV recurrences (RWKV-4, RWKV-6, RWKV-7), forward and backward, as CUDA kernels compiled
at run time by CuPy, callable on NumPy, CuPy and torch arrays (with autograd).  See README.md."""
from .registry import Arg, Kernel, Op, get_op, list_ops, register_op
from ._dispatch import backward, forward
from ._compile import KernelCompileError

__version__ = "0.1.0"


def __getattr__(name):
    # The built-in op functions (wkv4, wkv6, wkv7, their converters) live in rwkvops.ops.*; load them lazily so
    # that `import rwkvops` stays cheap and plugin discovery happens once, on first use.
    if name.startswith("_") or name in ("ops",):
        raise AttributeError(name)
    import importlib
    from .registry import _load_plugins
    _load_plugins()
    for mod in ("wkv7", "wkv6", "wkv4"):
        m = importlib.import_module(f"rwkvops.ops.{mod}")
        if hasattr(m, name):
            return getattr(m, name)
    raise AttributeError(f"module 'rwkvops' has no attribute {name!r}")


def check_errors(sync: bool = True) -> None:
    """Raise if a kernel on the current CUDA device reported bad device-side indices (syncs the device)."""
    import cupy
    from ._gpu import raise_pending_error
    raise_pending_error(cupy.cuda.Device().id, sync=sync)


__all__ = ["Arg", "Kernel", "Op", "register_op", "get_op", "list_ops", "forward", "backward",
           "KernelCompileError", "check_errors", "wkv4", "wkv6", "wkv7"]
