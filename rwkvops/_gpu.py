"""What GPU launchers share: the sequence description, launch helpers and the in-kernel error flag.

Kernel ABI shared by every op (so varlen, pools and dense batches are one code path in CUDA):

* per-token arrays are addressed as flat tokens ``[total_tokens, ...]``; sequence ``s`` covers tokens
  ``cu_seqlens[s] .. cu_seqlens[s+1]`` when ``cu_seqlens`` is non-null, else ``s*T .. s*T+T``;
* ``state_in`` may be null (zero initial state); ``state_out`` may be null (not wanted);
  with ``state_idx`` non-null, sequence ``s`` reads slot ``state_idx[s]`` of ``state_in`` and writes the same
  slot of ``state_out`` (a pool, in place: they alias); slot ``-1`` starts from zero and writes nothing;
* ``err`` points at a pinned host word the kernel sets (never clears) when it meets a bad device-side index;
  the next call on that device raises (see :func:`raise_pending_error`).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as _np

from ._arrays import DeviceView
from ._compile import get_function

_u64 = _np.uint64
_NULL = _u64(0)

ERR_BAD_CU_SEQLENS = 1
ERR_BAD_STATE_INDEX = 2
ERR_LOOKBACK_TIMEOUT = 3
ERR_MESSAGES = {
    ERR_BAD_CU_SEQLENS: "cu_seqlens (on the GPU) was not non-decreasing from 0 to T",
    ERR_BAD_STATE_INDEX: "state_indices (on the GPU) held an index outside [-1, pool size)",
    ERR_LOOKBACK_TIMEOUT: "a single-pass scan timed out waiting for an earlier block (wkv4 fused forward)",
}


@dataclasses.dataclass
class Seqs:
    """How tokens split into sequences for one launch.

    num: number of sequences (grid dimension); T: tokens per sequence when dense (0 with cu_seqlens);
    total: total tokens; cu_seqlens: int32 CuPy array [num + 1] or None; max_len: a host-side upper bound
    on any sequence's length (T when dense, the total otherwise).
    """

    num: int
    T: int
    total: int
    cu_seqlens: object = None
    state_idx: object = None
    pool_size: int = 0

    @property
    def max_len(self) -> int:
        return self.T if self.cu_seqlens is None else self.total

    def chunk_slots(self, chunk: int) -> int:
        """Upper bound on sum over sequences of ceil(len/chunk); sequence s's chunks start at
        cu[s] // chunk + s (see the kernels), so checkpoints need no host copy of cu_seqlens."""
        if self.cu_seqlens is None:
            return self.num * (-(-self.T // chunk))
        return self.total // chunk + self.num + 1


def ptr(x):
    """Raw device pointer of a CuPy array or launch view (``x.data.ptr``), or 0 (null) for None."""
    if x is None:
        return _NULL
    return _u64(x.ptr) if type(x) is DeviceView else _u64(x.data.ptr)


def aligned(*arrays, n=16) -> bool:
    """True when every array's data starts on an n-byte boundary (kernels then take their vector-load path)."""
    return all(int(ptr(a)) % n == 0 for a in arrays)


def check_aligned(op_name, **arrays):
    """Kernels use 16-byte vector accesses: refuse (rather than fault on) an array whose data starts off a 16-byte
    boundary (a view at an odd offset).  None entries are skipped."""
    for name, a in arrays.items():
        off = 0 if a is None else int(ptr(a)) % 16
        if off:
            raise ValueError(f"{op_name}: {name!r} must start at a 16-byte aligned address on the GPU (its data "
                             f"pointer is {int(ptr(a)):#x}, a view at offset {off} bytes?); pass a fresh contiguous "
                             "copy (.clone())")


_FUNCTIONS: dict = {}
_SMEM: dict = {}  # the dynamic shared-memory limit already raised per function


_CUPY = None   # the cupy module, looked up once: an import statement per launch costs host time in decode loops


def _cupy():
    global _CUPY
    if _CUPY is None:
        import cupy
        _CUPY = cupy
    return _CUPY


def _group_key(name_expression):
    """(element type, head size) of an instantiation: its first non-numeric and first numeric template argument."""
    args = [a.strip() for a in name_expression[name_expression.find("<") + 1:name_expression.rfind(">")].split(",")]
    return (next((a for a in args if a and not a.lstrip("-").isdigit()), None),
            next((a for a in args if a.lstrip("-").isdigit()), None))


def compile_group(name_expression, name_expressions):
    """The instantiations compiled together with ``name_expression``: those of the same element type and head size,
    so that a first call compiles only what its shapes need (a whole op's module takes a minute of NVRTC)."""
    key = _group_key(name_expression)
    return tuple(ne for ne in name_expressions if _group_key(ne) == key)


def launch(op_name, source, name_expression, name_expressions, grid, block, args, shared_mem=0):
    """Launch ``name_expression`` on the current stream (compiled once, with its compile_group)."""
    cupy = _CUPY or _cupy()
    key = (cupy.cuda.runtime.getDevice(), source, name_expression)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _FUNCTIONS[key] = get_function(op_name, source, name_expression,
                                            compile_group(name_expression, name_expressions))
    if shared_mem > 48 * 1024 and _SMEM.get(key, 0) < shared_mem:
        fn.max_dynamic_shared_size_bytes = shared_mem
        _SMEM[key] = shared_mem
    fn(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem, stream=cupy.cuda.get_current_stream())


@functools.lru_cache(maxsize=None)
def _error_word(device: int):
    import cupy
    import numpy as np
    with cupy.cuda.Device(device):
        mem = cupy.cuda.alloc_pinned_memory(4)
        host = np.frombuffer(mem, dtype=np.int32, count=1)
        host[0] = 0
    return mem, host


_ERR_PTRS: dict = {}


def error_ptr():
    """Device-visible pointer to this device's pinned error word (pinned host memory is mapped under UVA)."""
    cupy = _CUPY or _cupy()
    dev = cupy.cuda.runtime.getDevice()
    p = _ERR_PTRS.get(dev)
    if p is None:
        p = _ERR_PTRS[dev] = _u64(_error_word(dev)[0].ptr)
    return p


def raise_pending_error(device: int, sync: bool = False) -> None:
    """Raise (and clear) an error a kernel reported on ``device``; with ``sync``, wait for the device first."""
    mem, host = _error_word(device)
    if sync:
        import cupy
        with cupy.cuda.Device(device):
            cupy.cuda.Device(device).synchronize()
    code = int(host[0])
    if code:
        host[0] = 0
        raise ValueError("rwkvops: a previous kernel call reported bad input: " + ERR_MESSAGES.get(code, f"code {code}")
                         + "; its outputs are invalid")
