"""The one array/DLPack bridge: NumPy, CuPy, torch (CPU or CUDA) and any ``__dlpack__`` object.

Every call is handled by one :class:`Bridge`, chosen from the arrays passed in.  A bridge turns the caller's
arrays into the arrays the compute path works on (NumPy for the CPU path, CuPy for the GPU path), allocates
outputs, and turns results back into the caller's type, zero-copy wherever the two share memory.

bf16: NumPy and CuPy have no native bfloat16, so on the GPU a bf16 tensor travels as a ``uint16`` CuPy view
of the same memory (no copy, no fp32 round trip); the logical dtype is carried beside it as a string.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import numpy as np

DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


def _torch():
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def is_cupy(x) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def kind_of(x) -> str:
    """'numpy', 'cupy', 'torch' or 'dlpack' (any other object with ``__dlpack__``)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_torch(x):
        return "torch"
    if is_cupy(x):
        return "cupy"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return "dlpack"
    raise TypeError(f"expected a NumPy array, CuPy array, torch tensor or DLPack object, got {type(x).__name__}")


def dtype_name(x) -> str:
    if is_torch(x):
        return str(x.dtype).replace("torch.", "")
    return np.dtype(x.dtype).name if not hasattr(x.dtype, "name") else x.dtype.name


def device_of(x):
    """('cpu', None) or ('cuda', index)."""
    if isinstance(x, np.ndarray):
        return ("cpu", None)
    if is_torch(x):
        return ("cuda", x.device.index) if x.is_cuda else ("cpu", None)
    if is_cupy(x):
        return ("cuda", x.device.id)
    dev_type, dev_id = x.__dlpack_device__()
    return ("cuda", int(dev_id)) if int(dev_type) in (2, 3, 13) else ("cpu", None)


def is_c_contiguous(x) -> bool:
    if is_torch(x):
        return x.is_contiguous()
    flags = getattr(x, "flags", None)
    return bool(flags.c_contiguous) if flags is not None else True


_TORCH_DTYPE_NAMES: dict = {}


def describe(x):
    """(kind, device, dtype name, C-contiguous) of one array, in one pass (the validation hot path)."""
    t = _torch()
    if t is not None and isinstance(x, t.Tensor):
        dev = x.device
        name = _TORCH_DTYPE_NAMES.get(x.dtype)
        if name is None:
            name = _TORCH_DTYPE_NAMES[x.dtype] = str(x.dtype)[6:]
        return "torch", (("cuda", dev.index) if dev.type == "cuda" else ("cpu", None)), name, x.is_contiguous()
    return kind_of(x), device_of(x), dtype_name(x), is_c_contiguous(x)


def signature(x):
    """Hashable summary of everything validation reads from an array (type, shape, dtype, device, C-contiguity), or
    None for objects without cheap metadata (host int lists, generic DLPack producers): the key of the plan cache
    in :mod:`rwkvops._validate`."""
    t = _torch()
    if t is not None and isinstance(x, t.Tensor):
        return (x.shape, x.dtype, x.get_device(), x.is_contiguous())
    if isinstance(x, np.ndarray):
        return ("numpy", x.shape, x.dtype, x.flags.c_contiguous)
    if is_cupy(x):
        return ("cupy", x.shape, x.dtype, x.device.id, x.flags.c_contiguous)
    return None


class DeviceView:
    """A C-contiguous device array given by raw pointer, shape and storage dtype (``uint16`` for bf16, as CuPy views
    are): what kernel launchers read (``ptr(view)`` i.e. ``view.data.ptr``, ``.shape``, ``.dtype``, ``.nbytes``).

    The torch bridge hands these to inference launches instead of CuPy arrays: one is built in well under a
    microsecond, a CuPy ``ndarray`` over ``UnownedMemory`` costs several, and a decode call passes eight arrays.
    ``owner`` (the torch tensor) keeps the memory alive.  Any other attribute (``fill``, ``astype``, ...) is served by
    a CuPy view made on first use, so launchers written for CuPy arrays keep working, only slower;
    ``__cuda_array_interface__`` lets ``cupy.asarray(view)`` wrap it without a copy.
    """

    __slots__ = ("ptr", "shape", "dtype", "owner", "device", "_cp", "_rec")

    def __init__(self, ptr, shape, dtype, owner, device):
        self.ptr, self.shape, self.dtype, self.owner, self.device, self._cp = ptr, shape, dtype, owner, device, None
        self._rec = None     # the launch-plan recorder watching this view (rwkvops._gpu.Recorder), if any

    def _touched(self, what):
        # a launcher reached for the memory some other way than ptr(): device work a launch plan would not replay
        if self._rec is not None:
            self._rec.refuse(f"a launcher used {what} of a launch view")

    @property
    def data(self):
        return self          # ``x.data.ptr``, as on a CuPy array

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self):
        self._touched("nbytes")
        return self.size * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self):
        self._touched("__cuda_array_interface__")
        return {"shape": tuple(self.shape), "typestr": self.dtype.str, "data": (self.ptr, False), "strides": None,
                "version": 3}

    def cupy(self):
        """A CuPy ndarray over the same memory (kept alive by the owner)."""
        self._touched("the CuPy fallback")
        if self._cp is None:
            cp = require_cupy()
            if self.size == 0:
                self._cp = cp.empty(self.shape, dtype=self.dtype)
            else:
                mem = cp.cuda.UnownedMemory(self.ptr, self.nbytes, self.owner, self.device)
                self._cp = cp.ndarray(self.shape, dtype=self.dtype, memptr=cp.cuda.MemoryPointer(mem, 0))
        return self._cp

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.cupy(), name)

    def __repr__(self):
        return f"DeviceView(ptr={self.ptr:#x}, shape={tuple(self.shape)}, dtype={self.dtype})"


def require_cupy():
    try:
        import cupy
    except ImportError:
        raise ImportError(
            "rwkvops: the GPU path needs CuPy. Install it with `pip install rwkvops[cuda12]` "
            "(cupy-cuda12x) or `pip install rwkvops[cuda13]` (cupy-cuda13x)."
        ) from None
    return cupy


class Bridge:
    """Converts between the caller's arrays and the compute arrays (one bridge per array kind and device)."""

    gpu = False
    light_views = False   # has view()/empty_view() giving DeviceView arrays for inference launches

    def to_compute(self, x, dtype=None):
        raise NotImplementedError

    def from_compute(self, x, dtype: str):
        raise NotImplementedError

    def stream(self):
        return contextlib.nullcontext()


class NumpyBridge(Bridge):
    def to_compute(self, x, dtype=None):
        return np.asarray(x)

    def from_compute(self, x, dtype):
        return x


class TorchCpuBridge(Bridge):
    def to_compute(self, x, dtype=None):
        x = x.detach()
        if dtype_name(x) == "bfloat16":  # NumPy has no bf16: compute in float32 on the CPU path
            x = x.float()
        return x.numpy()

    def from_compute(self, x, dtype):
        torch = _torch()
        return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))


class DlpackCpuBridge(NumpyBridge):
    def to_compute(self, x, dtype=None):
        return np.from_dlpack(x)


class CupyBridge(Bridge):
    gpu = True

    def __init__(self, device):
        self.cp = require_cupy()
        self.device = device

    def to_compute(self, x, dtype=None):
        x = self.cp.asarray(x) if is_cupy(x) else self.cp.from_dlpack(x)
        return x.view(np.uint16) if x.dtype.name == "bfloat16" else x

    def from_compute(self, x, dtype):
        return x

    def empty(self, shape, dtype):
        return self.cp.empty(shape, dtype=_storage_dtype(dtype))

    def stream(self):
        return self.cp.cuda.Device(self.device)


class TorchCudaBridge(Bridge):
    """torch CUDA tensors: zero-copy views, kernels on torch's current stream, torch's allocator.

    Inference calls (no backward to save for) get :class:`DeviceView` arrays (``view``, ``empty_view``): a pointer,
    a shape and a dtype straight from the tensor, no CuPy object per array.  The autograd path gets CuPy views
    (``to_compute``, ``empty``), which its backward launchers compute on.  Both are built from ``data_ptr()`` rather
    than ``__dlpack__``: the kernels run on torch's current stream anyway, so DLPack's stream hand-shake would only
    add host time to every call (it dominated a one-token decode step).
    """

    gpu = True
    light_views = True
    _streams: dict = {}

    def __init__(self, device):
        self.cp = require_cupy()
        self.torch = _torch()
        self.device = device
        self.tdevice = self.torch.device("cuda", device)
        # ``raw_stream()``: the raw cudaStream_t of torch's current stream on this device, asked of torch on every
        # call (the current stream may change between calls), without building a torch.cuda.Stream object; a C
        # partial, so a launch-plan replay pays no Python frame for it
        raw = getattr(self.torch._C, "_cuda_getCurrentRawStream", None)
        self.raw_stream = (functools.partial(raw, device) if raw is not None
                           else (lambda: self.torch.cuda.current_stream(device).cuda_stream))
        # ``empty_strided(shape, stride, dtype)``: see allocator()
        guards = getattr(getattr(self.torch._C, "_dynamo", None), "guards", None)
        self.empty_strided = getattr(guards, "_empty_strided_cuda", None)

    def _view(self, t):
        cp = self.cp
        dtype = _storage_dtype(str(t.dtype)[6:])
        if t.numel() == 0:
            return cp.empty(tuple(t.shape), dtype=dtype)
        t = t.contiguous()
        mem = cp.cuda.UnownedMemory(t.data_ptr(), t.numel() * t.element_size(), t, self.device)
        return cp.ndarray(tuple(t.shape), dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))

    def to_compute(self, x, dtype=None):
        return self._view(x.detach())

    def view(self, t):
        """A :class:`DeviceView` of a C-contiguous CUDA tensor (validation has checked contiguity and device)."""
        return DeviceView(t.data_ptr(), tuple(t.shape), _TORCH_STORAGE[t.dtype], t, self.device)

    def from_compute(self, x, dtype):
        torch = self.torch
        if type(x) is DeviceView:
            if isinstance(x.owner, torch.Tensor) and x.owner.data_ptr() == x.ptr and tuple(x.owner.shape) == x.shape:
                return x.owner   # allocated by empty_view (or an input passed through): already a tensor
            x = x.cupy()
        owner = getattr(getattr(x.data, "mem", None), "_owner", None)
        if isinstance(owner, torch.Tensor) and owner.data_ptr() == x.data.ptr and tuple(owner.shape) == x.shape:
            return owner  # an output allocated through empty(): already the caller's tensor
        t = torch.from_dlpack(x)
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t

    def empty(self, shape, dtype):
        torch = self.torch
        t = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.tdevice)
        return self._view(t)

    def allocator(self, shape, dtype):
        """A C callable ``() -> fresh uninitialized C-contiguous tensor`` of ``shape`` and ``dtype`` (a name) from
        torch's allocator on its current stream and the *current* device: the outputs and scratch of a launch-plan
        replay (which runs only while the current device is the plan's).  torch's own fast entry when it has one
        (``_empty_strided_cuda``, what inductor's generated code allocates with: no argument parsing or dispatch,
        about half the host time of ``torch.empty_like``), else ``torch.empty`` with the arguments bound.  Called
        while recording (the plan's device current): the fast entry is tried once there, as it is a private API."""
        torch = self.torch
        dt = getattr(torch, dtype)
        shape = tuple(int(n) for n in shape)
        if self.empty_strided is not None:
            stride, n = [], 1
            for d in reversed(shape):
                stride.append(n)
                n *= max(d, 1)
            new = functools.partial(self.empty_strided, shape, tuple(reversed(stride)), dt)
            try:
                t = new()
                if (tuple(t.shape) == shape and t.dtype == dt and t.device == self.tdevice and t.is_contiguous()
                        and type(t) is torch.Tensor):
                    return new
            except Exception:
                pass
        return functools.partial(torch.empty, shape, dtype=dt, device=self.tdevice)

    def empty_view(self, shape, dtype):
        """An uninitialized tensor from torch's allocator (on its current stream), as a :class:`DeviceView`."""
        t = self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.tdevice)
        return DeviceView(t.data_ptr(), tuple(shape), _TORCH_STORAGE[t.dtype], t, self.device)

    def stream(self):
        # Launch on torch's current stream (one cached CuPy wrapper per torch stream).
        s = self.raw_stream()
        key = (s, self.device)
        cs = self._streams.get(key)
        if cs is None:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                cs = self._streams[key] = self.cp.cuda.ExternalStream(s, self.device)
        return _OnStream(self.cp.cuda.Device(self.device), cs)


class _OnStream:
    """``with``: the CuPy device and stream current for the launches of one call (a plain class: a
    ``contextlib.contextmanager`` generator costs microseconds per call)."""

    __slots__ = ("dev", "stream")

    def __init__(self, dev, stream):
        self.dev, self.stream = dev, stream

    def __enter__(self):
        self.dev.__enter__()
        self.stream.__enter__()

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self.dev.__exit__(*exc)
        return False


class _StorageDtypes(dict):
    """torch dtype -> NumPy storage dtype of its launch view (bf16 travels as uint16)."""

    def __missing__(self, tdtype):
        v = self[tdtype] = np.dtype(_storage_dtype(str(tdtype)[6:]))
        return v


_TORCH_STORAGE = _StorageDtypes()


def _storage_dtype(dtype: str):
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


_BRIDGES: dict = {}


def make_bridge(kind: str, device) -> Bridge:
    """The bridge for arrays of ``kind`` on ``device`` (bridges hold no per-call state: one per (kind, device))."""
    b = _BRIDGES.get((kind, device))
    if b is None:
        b = _BRIDGES[(kind, device)] = _new_bridge(kind, device)
    return b


def _new_bridge(kind: str, device) -> Bridge:
    on_gpu = device[0] == "cuda"
    if kind == "numpy":
        return NumpyBridge()
    if kind == "torch":
        return TorchCudaBridge(device[1]) if on_gpu else TorchCpuBridge()
    if kind in ("cupy", "dlpack"):
        return CupyBridge(device[1]) if on_gpu else DlpackCpuBridge()
    raise TypeError(kind)
