"""A small view of any array the binding accepts: pointer, shape, element strides, dtype, device.

Host arrays: numpy.ndarray (and torch CPU tensors, for the kvpress adapter). Device arrays: torch
CUDA tensors (read directly, so bfloat16 works), any object with ``__cuda_array_interface__``
(CuPy, Numba, ...) and any object with ``__dlpack__`` (read from the DLPack capsule; the capsule is
kept alive with the view). Nothing here imports torch or cupy unless the array is one.
"""
from __future__ import annotations

import contextlib
import ctypes
import numbers
import operator
import sys

import numpy as np

# dtype tags used throughout the binding
#   f32 f16 bf16 fp8_e4m3   the cache dtypes (kvc_dtype_t)
#   u16 u8                  raw storage (bf16 / fp8 bits), accepted when the plan states the dtype
#   i32 i64 i16 f64 ...     others (index arrays; rejected where a cache dtype is needed)
_NUMPY_NAMES = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float8_e4m3fn": "fp8_e4m3",
    "uint16": "u16",
    "uint8": "u8",
    "int32": "i32",
    "int64": "i64",
    "int16": "i16",
    "int8": "i8",
    "float64": "f64",
    "uint32": "u32",
    "uint64": "u64",
    "bool": "bool",
}
_TORCH_NAMES = {"torch." + k: v for k, v in _NUMPY_NAMES.items()}
_TYPESTR = {
    "f4": "f32", "f2": "f16", "u2": "u16", "u1": "u8", "i4": "i32", "i8": "i64", "i2": "i16",
    "i1": "i8", "f8": "f64", "u4": "u32", "u8": "u64", "b1": "bool",
}
_DL_CODES = {
    (2, 32): "f32", (2, 16): "f16", (4, 16): "bf16", (1, 16): "u16", (1, 8): "u8", (0, 32): "i32",
    (0, 64): "i64", (0, 16): "i16", (0, 8): "i8", (2, 64): "f64", (1, 32): "u32", (1, 64): "u64",
}
_ITEMSIZE = {
    "f32": 4, "f16": 2, "bf16": 2, "fp8_e4m3": 1, "u16": 2, "u8": 1, "i32": 4, "i64": 8, "i16": 2,
    "i8": 1, "f64": 8, "u32": 4, "u64": 8, "bool": 1,
}

CPU = ("cpu", 0)


# --------------------------------------------------------------------------------------------
# Scalar arguments: exact, never coerced (16.9 is not 16, "0.5" is not 0.5, 2**32 + 16 is not 16)
# --------------------------------------------------------------------------------------------

_INT_RANGES = {32: (-(2**31), 2**31 - 1), 64: (-(2**63), 2**63 - 1)}


def integer(value, name, bits=32):
    """`value` as a Python int if it is an integer (int, numpy integer, anything with __index__; not
    bool, float or str) that fits a signed `bits`-bit C field; else TypeError / ValueError naming
    the argument."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an integer, got bool {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}") from None
    lo, hi = _INT_RANGES[bits]
    if not lo <= out <= hi:
        raise ValueError(f"{name}: {out} does not fit int{bits} ([{lo}, {hi}])")
    return out


def real(value, name):
    """`value` as a Python float if it is a real number (int, float, numpy number; not bool or str);
    else TypeError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def flag(value, name):
    """0 or 1 from a bool or the integers 0 / 1; else TypeError / ValueError naming the argument."""
    if isinstance(value, (bool, np.bool_)):
        return int(bool(value))
    out = integer(value, name)
    if out not in (0, 1):
        raise ValueError(f"{name}: expected a bool or 0 / 1, got {out}")
    return out


class ArrayView:
    """What the binding needs to know about one array argument."""

    __slots__ = ("obj", "name", "ptr", "shape", "strides", "dtype", "itemsize", "device", "lib", "readonly", "_keep")

    def __init__(self, obj, name, ptr, shape, strides, dtype, itemsize, device, lib, keep=None, readonly=False):
        self.obj = obj
        self.name = name
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)  # elements
        self.dtype = dtype
        self.itemsize = itemsize
        self.device = device  # ("cpu", 0) or ("cuda", ordinal); ordinal None when unknown
        self.lib = lib  # "numpy", "torch", "cupy", "cai", "dlpack"
        self.readonly = bool(readonly)  # the array says its memory must not be written
        self._keep = keep

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_cuda(self):
        return self.device[0] == "cuda"

    def is_c_contiguous(self):
        if self.size == 0:
            return True  # nothing to lay out (numpy reports zero strides for empty arrays)
        expect = 1
        for dim, stride in zip(reversed(self.shape), reversed(self.strides)):
            if dim != 1 and stride != expect:
                return False
            expect *= dim
        return True

    def extent(self):
        """1 + the largest element offset reachable through shape and (positive) strides."""
        if self.size == 0:
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.shape, self.strides))

    def where(self):
        return "cpu" if self.device[0] == "cpu" else f"cuda:{self.device[1]}"


def _torch_view(obj, name):
    dt = _TORCH_NAMES.get(str(obj.dtype), str(obj.dtype))
    dev = obj.device
    device = ("cuda", dev.index if dev.index is not None else 0) if dev.type == "cuda" else (dev.type, 0)
    return ArrayView(obj, name, obj.data_ptr(), tuple(obj.shape), tuple(obj.stride()), dt,
                     obj.element_size(), device, "torch")


def _numpy_view(arr, name):
    dt = _NUMPY_NAMES.get(arr.dtype.name, arr.dtype.name)
    isz = arr.dtype.itemsize
    if any(s % isz for s in arr.strides):
        raise ValueError(f"{name}: numpy strides {arr.strides} are not multiples of the item size {isz}")
    return ArrayView(arr, name, arr.ctypes.data, arr.shape, tuple(s // isz for s in arr.strides), dt, isz,
                     CPU, "numpy", readonly=not arr.flags.writeable)


def _cai_view(obj, name, cai):
    typestr = cai["typestr"]
    dt = _TYPESTR.get(typestr[1:], typestr)
    if typestr[0] == ">":
        raise TypeError(f"{name}: big-endian device arrays are not supported")
    isz = int(typestr[2:]) if typestr[2:].isdigit() else _ITEMSIZE.get(dt, 1)
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is None:
        el, acc = [], 1
        for d in reversed(shape):
            el.append(acc)
            acc *= d
        strides_el = tuple(reversed(el))
    else:
        if any(s % isz for s in strides):
            raise ValueError(f"{name}: strides {strides} are not multiples of the item size {isz}")
        strides_el = tuple(s // isz for s in strides)
    mod = type(obj).__module__.split(".")[0]
    ordinal = None
    lib = "cai"
    if mod == "cupy":
        ordinal = int(obj.device.id)
        lib = "cupy"
    return ArrayView(obj, name, cai["data"][0] or 0, shape, strides_el, dt, isz, ("cuda", ordinal), lib,
                     readonly=bool(cai["data"][1]))


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_capsule_get = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get.restype = ctypes.c_void_p
_capsule_get.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _dlpack_view(obj, name):
    capsule = obj.__dlpack__()
    ptr = _capsule_get(capsule, b"dltensor")
    t = _DLTensor.from_address(ptr)  # DLManagedTensor starts with its DLTensor
    if t.dtype.lanes != 1:
        raise TypeError(f"{name}: vector DLPack dtypes are not supported")
    dt = _DL_CODES.get((t.dtype.code, t.dtype.bits), f"dlpack(code={t.dtype.code},bits={t.dtype.bits})")
    isz = max(1, t.dtype.bits // 8)
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides:
        strides = tuple(t.strides[i] for i in range(t.ndim))
    else:
        el, acc = [], 1
        for d in reversed(shape):
            el.append(acc)
            acc *= d
        strides = tuple(reversed(el))
    dev_type = t.device.device_type
    if dev_type in (1, 3):  # kDLCPU, kDLCUDAHost
        device = CPU
    elif dev_type in (2, 13):  # kDLCUDA, kDLCUDAManaged
        device = ("cuda", int(t.device.device_id))
    else:
        device = (f"dlpack-device-{dev_type}", int(t.device.device_id))
    data = (t.data or 0) + int(t.byte_offset)
    return ArrayView(obj, name, data, shape, strides, dt, isz, device, "dlpack", keep=capsule)


def view(obj, name):
    """An ArrayView of `obj`, or TypeError naming the argument."""
    if isinstance(obj, ArrayView):
        return obj
    if isinstance(obj, np.ndarray):
        return _numpy_view(obj, name)
    mod = type(obj).__module__.split(".")[0]
    if mod == "torch" and hasattr(obj, "data_ptr") and hasattr(obj, "stride"):
        return _torch_view(obj, name)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _cai_view(obj, name, cai)
    if hasattr(obj, "__dlpack__"):
        return _dlpack_view(obj, name)
    if hasattr(obj, "__array_interface__"):
        return _numpy_view(np.asarray(obj), name)
    raise TypeError(
        f"{name}: expected a numpy array (CPU) or an array with __cuda_array_interface__ / __dlpack__ "
        f"(CUDA), got {type(obj).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Allocation in the array library of an input
# --------------------------------------------------------------------------------------------

_NP_DTYPES = {"f32": np.float32, "i32": np.int32, "u8": np.uint8}


def _torch_dtype(torch, tag):
    return {"f32": torch.float32, "i32": torch.int32, "u8": torch.uint8}[tag]


def alloc_lib(like: ArrayView):
    """The library outputs and workspaces are allocated with for arrays like `like`."""
    if not like.is_cuda:
        return "torch" if like.lib == "torch" else "numpy"
    if like.lib in ("torch", "cupy"):
        return like.lib
    mod = type(like.obj).__module__.split(".")[0]
    if mod in ("torch", "cupy"):
        return mod
    for cand in ("torch", "cupy"):
        if cand in sys.modules:
            return cand
    for cand in ("torch", "cupy"):
        try:
            __import__(cand)
            return cand
        except ImportError:
            pass
    raise TypeError(
        f"{like.name}: cannot allocate device memory for a {type(like.obj).__name__}: install torch or "
        f"cupy, or pass out= arrays"
    )


def empty(lib, device, shape, tag):
    """An uninitialised array of `lib` on `device` ("cpu", 0) / ("cuda", i)."""
    if lib == "numpy":
        return np.empty(shape, dtype=_NP_DTYPES[tag])
    if lib == "torch":
        import torch

        dev = "cpu" if device[0] == "cpu" else torch.device("cuda", device[1] or 0)
        return torch.empty(shape, dtype=_torch_dtype(torch, tag), device=dev)
    if lib == "cupy":
        import cupy

        with cupy.cuda.Device(device[1] or 0):
            return cupy.empty(shape, dtype=_NP_DTYPES[tag])
    raise TypeError(f"cannot allocate with {lib}")


ALIGN = 256


class Workspace:
    """A 256-byte aligned byte buffer in `lib` on `device`."""

    def __init__(self, lib, device, nbytes):
        self.lib, self.device, self.nbytes = lib, device, int(nbytes)
        self.buf = empty(lib, device, (self.nbytes + ALIGN,), "u8")
        base = view(self.buf, "workspace").ptr
        self.offset = (-base) % ALIGN
        self.ptr = base + self.offset

    def read_i32(self, byte_offset, count, stream=None):
        """A fresh int32 array (of the workspace's library) copied from the workspace, the copy queued
        on `stream` (the handle of the call that wrote it; None: the default stream)."""
        lo = self.offset + int(byte_offset)
        hi = lo + 4 * int(count)
        if self.lib == "numpy":
            return self.buf[lo:hi].view(np.int32).copy()
        with on_stream(self.lib, self.device, stream or 0):
            if self.lib == "torch":
                import torch

                return self.buf[lo:hi].view(torch.int32).clone()
            return self.buf[lo:hi].view(np.int32).copy()  # cupy


def current_stream(lib, device):
    """The stream handle (int) the library's current stream is, 0 (NULL) if unknown."""
    if device[0] != "cuda":
        return 0
    if lib == "torch":
        import torch

        return int(torch.cuda.current_stream(device[1] or 0).cuda_stream)
    if lib == "cupy":
        import cupy

        with cupy.cuda.Device(device[1] or 0):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


@contextlib.contextmanager
def on_stream(lib, device, handle):
    """A context in which `lib` (torch or cupy) allocates and copies on the stream `handle` (0 or
    None: the library's default stream of `device`). The binding builds the temporaries of an
    asynchronous call in it (device pointer arrays, converted tables): both libraries' pools are
    stream-ordered, so once such a temporary is dropped after the call returns, its memory is
    handed out again only to work queued behind the call on that same stream."""
    if device[0] != "cuda" or lib not in ("torch", "cupy"):
        yield
    elif lib == "torch":
        import torch

        dev = torch.device("cuda", device[1] or 0)
        with torch.cuda.stream(torch.cuda.ExternalStream(handle, device=dev) if handle
                               else torch.cuda.default_stream(dev)):
            yield
    else:
        import cupy

        with cupy.cuda.Device(device[1] or 0), (cupy.cuda.ExternalStream(handle) if handle
                                                 else cupy.cuda.Stream.null):
            yield


def stream_handle(stream):
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr", "handle"):
        h = getattr(stream, attr, None)
        if isinstance(h, int):
            return h
    if isinstance(stream, ctypes.c_void_p):
        return stream.value or 0
    raise TypeError(f"stream: expected an int handle, a torch.cuda.Stream or a cupy Stream, got {type(stream).__name__}")


def to_int32_host(obj, name):
    """A C-contiguous int32 numpy copy of a host index array-like (lists, numpy, torch CPU)."""
    if type(obj).__module__.split(".")[0] == "torch":
        obj = obj.detach().cpu().numpy()
    arr = np.asarray(obj)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise ValueError(f"{name}: values do not fit int32")
    return np.ascontiguousarray(arr, dtype=np.int32)
