"""Loading pretrained diffusers models the same way everywhere (autoencoders, UNets, transformers)."""

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
