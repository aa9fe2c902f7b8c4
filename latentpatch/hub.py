"""Loading pretrained diffusers and transformers models the same way everywhere (autoencoders, UNets, DiTs,
text encoders)."""

from __future__ import annotations

from typing import Any


def load_kwargs() -> dict[str, Any]:
    """`from_pretrained` keywords for every diffusers model we load.

    Without accelerate (an optional package) diffusers falls back to a plain load and logs a warning that
    asks the user to install it, once per model; we ask for the plain load ourselves, so nothing is printed
    that does not concern the user.
    """
    from diffusers.models import modeling_utils

    return {"low_cpu_mem_usage": bool(modeling_utils.is_accelerate_available())}


def transformers_load_kwargs() -> dict[str, Any]:
    """`from_pretrained` keywords for every transformers model we load: float32 weights, as the rest of the model
    runs (transformers 5 otherwise keeps the checkpoint's dtype, often float16)."""
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
