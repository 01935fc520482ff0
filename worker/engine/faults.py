"""What can go wrong while generating, and whose fault it is: one request's (it fails alone), the
batch's (out of memory: retried smaller), or the device's (fatal: the worker process must go)."""

from __future__ import annotations

import torch

from worker.model.group import GroupLost

# Errors after which a CUDA context is unusable: every later call fails too, so the process must go.
FATAL_DEVICE_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "CUDA error",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` left the device unusable (as opposed to failing one request)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, GroupLost):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(marker in str(exc) for marker in FATAL_DEVICE_MARKERS)


class GenerationError(Exception):
    """A job that cannot be generated; ``type`` goes into the job's error."""

    type = "generation_error"


class RequestValidationError(GenerationError):
    """A request the model cannot serve (too long a prompt, too many tokens)."""

    type = "validation_error"


class DeviceFault(GenerationError):
    """The device failed in a way that ends this worker process (see ``is_fatal_device_error``)."""

    type = "device_error"


class OutOfMemory(GenerationError):
    """The request does not fit in device memory even alone."""

    type = "out_of_memory"


NON_FINITE = ValueError(
    "the next-token distribution was not finite (NaN or infinity): the model's scores for this request, "
    "after its repetition penalty and sampling parameters, give no valid choice"
)


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def row_error(doing: str, exc: BaseException) -> GenerationError:
    """The error one request fails with, when only it is at fault."""
    detail = str(exc) if isinstance(exc, ValueError) and exc is NON_FINITE else f"{type(exc).__name__}: {exc}"
    return GenerationError(f"{doing} failed for this request alone ({detail}); other jobs were not affected")
