"""Where models run: CUDA with bf16 weights when a GPU is there, CPU with fp32 otherwise.

Every model in ``trainer`` goes through these two functions, so the GPU and CPU paths are the
same code. Nothing here touches CUDA at import time: ``torch.cuda.is_available()`` is only called
when a model is built, which is after gunicorn has forked its workers.
"""

from __future__ import annotations

import os
import re

import torch


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: this process's CUDA device if there is one, else the CPU.

    A process that ``accelerate launch`` started (``LOCAL_RANK``) takes the GPU of its rank.
    """
    if requested is None or requested in ("", "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for, but torch sees no CUDA device.")
    return device


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (half the memory, tensor cores), fp32 everywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for the weights' dtype (renamed in transformers 4.56)."""
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
