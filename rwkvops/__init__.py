"""rwkvops: the RWKV WKV recurrences (RWKV-4, RWKV-6, RWKV-7), forward and backward, as CUDA kernels compiled
at run time by CuPy, callable on NumPy, CuPy and torch arrays (with autograd).  See README.md."""
from .registry import Arg, Kernel, Op, get_op, list_ops, register_op
from ._dispatch import backward, forward
from ._compile import KernelCompileError

__version__ = "0.1.0"


def __getattr__(name):
    # The built-in op functions live in rwkvops.ops.<name> (with their converters, e.g. rwkvops.ops.wkv7.to_fla);
    # they load lazily so that `import rwkvops` stays cheap. Plugin ops are reachable as attributes too.
    if name in ("wkv4", "wkv6", "wkv7"):
        import importlib
        return getattr(importlib.import_module(f"rwkvops.ops.{name}"), name)
    if not name.startswith("_"):
        from .registry import _REGISTRY, _load_plugins
        _load_plugins()
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise AttributeError(f"module 'rwkvops' has no attribute {name!r}")


def check_errors(sync: bool = True) -> None:
    """Raise if a kernel on the current CUDA device reported bad device-side indices (syncs the device)."""
    import cupy
    from ._gpu import raise_pending_error
    raise_pending_error(cupy.cuda.Device().id, sync=sync)


__all__ = ["Arg", "Kernel", "Op", "register_op", "get_op", "list_ops", "forward", "backward",
           "KernelCompileError", "check_errors", "wkv4", "wkv6", "wkv7"]
