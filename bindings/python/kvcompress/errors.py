"""C status codes as Python exceptions.

Every failing C call raises a subclass of :class:`KvcError` chosen by its status, carrying the
status name (``"KVC_ERROR_BUDGET"``), the C function and the library's detail sentence
(``kvc_last_error``: which argument, which sequence, which value). Argument errors the binding
catches before calling C are plain :class:`ValueError` / :class:`TypeError` naming the argument.
"""
from __future__ import annotations

SUCCESS = 0
ERROR_INVALID_VALUE = 1
ERROR_NOT_SUPPORTED = 2
ERROR_BUDGET = 3
ERROR_WORKSPACE_TOO_SMALL = 4
ERROR_OUT_OF_MEMORY = 5
ERROR_NO_DEVICE = 6
ERROR_CUDA = 7
ERROR_INTERNAL = 8


class KvcError(RuntimeError):
    """A libkvcompress call failed.

    Attributes: ``status`` (int), ``status_name`` ("KVC_ERROR_..."), ``function`` (the C
    function), ``detail`` (kvc_last_error of the context: the argument, sequence and value).
    """

    status = -1

    def __init__(self, status, status_name, function, detail, summary=""):
        self.status = int(status)
        self.status_name = status_name
        self.function = function
        self.detail = detail
        self.summary = summary
        msg = f"{function} failed with {status_name}"
        if detail:
            msg += f": {detail}"
        elif summary:
            msg += f" ({summary})"
        super().__init__(msg)


class InvalidValueError(KvcError, ValueError):
    """KVC_ERROR_INVALID_VALUE: an argument or metadata value is wrong."""

    status = ERROR_INVALID_VALUE


class NotSupportedError(KvcError, NotImplementedError):
    """KVC_ERROR_NOT_SUPPORTED: valid, but not implemented on this backend."""

    status = ERROR_NOT_SUPPORTED


class BudgetError(KvcError, ValueError):
    """KVC_ERROR_BUDGET: protected tokens exceed a sequence's budget."""

    status = ERROR_BUDGET


class WorkspaceTooSmallError(KvcError, ValueError):
    """KVC_ERROR_WORKSPACE_TOO_SMALL."""

    status = ERROR_WORKSPACE_TOO_SMALL


class OutOfMemoryError(KvcError, MemoryError):
    """KVC_ERROR_OUT_OF_MEMORY: a host or device allocation failed."""

    status = ERROR_OUT_OF_MEMORY


class NoDeviceError(KvcError):
    """KVC_ERROR_NO_DEVICE: CUDA asked for, but no usable device or no CUDA build."""

    status = ERROR_NO_DEVICE


class CudaError(KvcError):
    """KVC_ERROR_CUDA: a CUDA runtime call failed."""

    status = ERROR_CUDA


class InternalError(KvcError):
    """KVC_ERROR_INTERNAL: a bug in libkvcompress."""

    status = ERROR_INTERNAL


STATUS_CLASSES = {
    cls.status: cls
    for cls in (
        InvalidValueError,
        NotSupportedError,
        BudgetError,
        WorkspaceTooSmallError,
        OutOfMemoryError,
        NoDeviceError,
        CudaError,
        InternalError,
    )
}


def error_for(status, status_name, function, detail, summary=""):
    cls = STATUS_CLASSES.get(int(status), KvcError)
    return cls(status, status_name, function, detail, summary)
