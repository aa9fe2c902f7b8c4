"""diffusers' model hooks (diffusers.hooks.HookRegistry: a hook's `new_forward` replaces a module's forward and
can skip it) as every cache here installs them, and their removal, which leaves each module as it was."""

from __future__ import annotations

from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn


def register(module: nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def remove(root: nn.Module, name: str) -> None:
    """Remove the hooks called `name` under `root`; a module left with no hook loses the registry and the
    forward diffusers set on it, so the network is the one that was loaded (state dict, copies, repr)."""
    HookRegistry.check_if_exists_or_initialize(root).remove_hook(name, recurse=True)
    for module in root.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and not registry.hooks:
            del module._diffusers_hook
            module.__dict__.pop("forward", None)


class ReuseHook(ModelHook):
    """A module's output, computed on full calls and returned unchanged while `state.reuse` is set."""

    def __init__(self, state: Any) -> None:
        super().__init__()
        self.state, self.output = state, None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.state.reuse:
            return self.output
        self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.output = None
        return module
