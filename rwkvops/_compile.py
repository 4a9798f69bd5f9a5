"""The one compile cache: CUDA sources from ``cuda_src/``, instantiated with ``name_expressions``.

Modules are memoized per (source, instantiations, options, device) in this process; CuPy's on-disk cache
(``~/.cupy/kernel_cache`` or ``CUPY_CACHE_DIR``) makes a second process start without compiling.
:func:`nvrtc_check` compiles a source to PTX with NVRTC alone, which needs no GPU (used by CI).
"""
from __future__ import annotations

import functools
import os
import pathlib

CUDA_SRC = pathlib.Path(__file__).resolve().parent / "cuda_src"
if not CUDA_SRC.is_dir():  # editable/source checkout: cuda_src/ sits beside the package
    CUDA_SRC = pathlib.Path(__file__).resolve().parent.parent / "cuda_src"

CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
# RWKVOPS_LINEINFO=1 adds line tables to the compiled kernels, for profilers' source views (ncu); no speed change.
OPTIONS = ("-std=c++17",) + (("-lineinfo",) if os.environ.get("RWKVOPS_LINEINFO") else ())


class KernelCompileError(RuntimeError):
    """A CUDA source failed to compile; the message names the op, instantiation, options and log."""


def source_dirs(extra=()):
    """Folders searched for CUDA sources: the package's own, then plugins' folders."""
    return (CUDA_SRC, *map(pathlib.Path, extra))


@functools.lru_cache(maxsize=None)
def read_source(path: str) -> str:
    p = pathlib.Path(path)
    if not p.is_absolute():
        p = CUDA_SRC / p
    if not p.is_file():
        raise FileNotFoundError(f"rwkvops: CUDA source {str(p)!r} not found (is cuda_src/ installed?)")
    text = p.read_text()
    # Inline local includes so the module is one string: CuPy's cache key then covers them too.
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith('#include "'):
            inc = s.split('"')[1]
            # beside the including file first, then rwkvops' own cuda_src/: plugins share common.cuh (the ABI)
            local = p.parent / inc
            out.append(read_source(str(local if local.is_file() else CUDA_SRC / inc)))
        else:
            out.append(line)
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def _module(source: str, name_expressions: tuple, options: tuple, device: int, op_name: str):
    import cupy

    code = read_source(source)
    with cupy.cuda.Device(device):
        mod = cupy.RawModule(code=code, options=options, name_expressions=name_expressions)
        try:
            mod.compile()
        except Exception as exc:
            log = getattr(exc, "get_message", lambda: str(exc))()
            raise KernelCompileError(
                f"rwkvops: compiling op {op_name!r} from {source} failed\n"
                f"  instantiations: {', '.join(name_expressions)}\n  options: {' '.join(options)}\n{log}"
            ) from None
    return mod


def get_function(op_name: str, source: str, name_expression: str, name_expressions: tuple, options=OPTIONS):
    """The compiled kernel ``name_expression`` from the module of all ``name_expressions`` of ``source``."""
    import cupy

    device = cupy.cuda.Device().id
    return _module(source, tuple(name_expressions), tuple(options), device, op_name).get_function(name_expression)


def nvrtc_check(op_name: str, source: str, name_expressions, arch: str = "compute_90", options=OPTIONS) -> str:
    """Compile ``source`` with NVRTC to PTX for ``arch`` without a GPU; return the PTX.  Raises KernelCompileError."""
    from cupy.cuda import nvrtc

    code = read_source(source)
    opts = [*options, f"-arch={arch}", *(f"-I{d}" for d in cuda_include_dirs())]
    prog = nvrtc.createProgram(code, source, [], [])
    try:
        for ne in name_expressions:
            nvrtc.addNameExpression(prog, ne)
        try:
            nvrtc.compileProgram(prog, list(opts))
        except nvrtc.NVRTCError:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(
                f"rwkvops: NVRTC compile of op {op_name!r} from {source} for {arch} failed\n"
                f"  instantiations: {', '.join(name_expressions)}\n  options: {' '.join(opts)}\n{log}"
            ) from None
        for ne in name_expressions:
            nvrtc.getLoweredName(prog, ne)  # every instantiation must exist
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)


def cuda_include_dirs():
    """Header folders for NVRTC without a CUDA toolkit install (``cuda_fp16.h``, ``cuda_bf16.h``)."""
    dirs = []
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            dirs.append(os.path.join(os.environ[env], "include"))
    try:
        import nvidia.cuda_runtime as rt  # from the nvidia-cuda-runtime wheel that cupy[ctk] brings
        for p in rt.__path__:
            dirs.append(os.path.join(p, "include"))
    except ImportError:
        pass
    try:
        import nvidia.cuda_nvrtc as nv
        for p in nv.__path__:
            dirs.append(os.path.join(p, "include"))
    except ImportError:
        pass
    return [d for d in dirs if os.path.isdir(d)]
