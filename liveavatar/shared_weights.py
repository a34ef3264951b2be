"""Engine modules around weights that another owner holds (ComfyUI's VAE and audio encoder).

`bind_parameters` makes a module's parameters the owner's very Parameter objects: no copy,
and when the owner moves or casts its module (Module.to keeps each Parameter object and swaps
its data), ours follow. `computing_in` runs such a module in one compute dtype whatever dtypes
the weights are stored in, casting one module's own weights at a time, for its call only.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping

import torch
from torch import nn


def bind_parameters(module: nn.Module, parameters: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Give `module` (built on the meta device) exactly `parameters`, by name; a ValueError
    naming `what` when they do not fit."""
    expected = dict(module.named_parameters())
    missing = sorted(set(expected) - set(parameters))
    unexpected = sorted(set(parameters) - set(expected))
    wrong = [f"{n}: {tuple(parameters[n].shape)} vs {tuple(t.shape)}" for n, t in expected.items()
             if n in parameters and tuple(parameters[n].shape) != tuple(t.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"the {what} weights do not fit the network they describe: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    for name, tensor in parameters.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner.register_parameter(attr, tensor if isinstance(tensor, nn.Parameter)
                                 else nn.Parameter(tensor, requires_grad=False))
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"the {what} network has state the weights do not give: {left[:4]}")
    return module


def placement_of(module: nn.Module, what: str) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a module's weights; they must all be on one device (an owner that
    left some on another, e.g. a partial load, must load them fully first)."""
    params = list(module.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"the {what} weights are spread over {sorted(map(str, devices))}: load it fully on one "
                         "device first")
    dtypes = [p.dtype for p in params]
    return params[0].device, max(set(dtypes), key=dtypes.count)


@contextmanager
def computing_in(module: nn.Module, dtype: torch.dtype):
    """Within: every call of a sub-module whose own weights are not `dtype` sees them cast to
    `dtype` (a copy of that one module's weights, dropped after its call). The stored weights
    are never changed."""
    stash: dict[int, dict] = {}

    def cast(sub, _inputs):
        stash[id(sub)] = {}
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                stash[id(sub)][name] = param
                sub.register_parameter(name, nn.Parameter(param.detach().to(dtype), requires_grad=False))

    def restore(sub, *_):
        for name, param in stash.pop(id(sub), {}).items():
            sub.register_parameter(name, param)

    hooks, subs = [], {}
    for sub in module.modules():
        if any(p.is_floating_point() and p.dtype != dtype for p in sub.parameters(recurse=False)):
            subs[id(sub)] = sub
            hooks += [sub.register_forward_pre_hook(cast), sub.register_forward_hook(restore)]
    try:
        yield module
    finally:
        for hook in hooks:
            hook.remove()
        for key in list(stash):  # a call that raised never reached its restore
            restore(subs[key])
