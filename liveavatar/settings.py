"""How one model computes, apart from its weights: `RunOptions`, carried by the model
(`LiveAvatarDiT.options`, changed between runs with `use_options`), never a process-wide switch,
so two models in one process can run with different options.

- `kernels`: the fused Triton element-wise kernels (kernels.py). auto: on for CUDA tensors
  when Triton imports and its self-check on the GPU passes; on: also under Triton's CPU
  interpreter (TRITON_INTERPRET=1, tests); off: always the plain-PyTorch references.
- `attention`: how attention reads the sink and a step's KV ring (attention.py). auto: a ring
  in the compute dtype is attended where it lies and merged with the copied sink by
  log-sum-exp; gather: every segment copied into one buffer, one attention call.
- `fp8_compute`: fp8 (e4m3fn) weights on a GPU. auto: multiplied on the fp8 tensor cores
  (torch._scaled_mm) where the GPU takes it, else dequantised; dequantize: always
  dequantised to bf16 first (a plain bf16 matmul).
- `cuda_graphs`: a run on one GPU replays its steady ticks as CUDA graphs (graphs.py). auto: on
  for CUDA when the memory plan leaves room for the graphs' own activations; off: every tick
  queued kernel by kernel.

Environment variables only give the defaults of a model built without options
(`RunOptions.from_env`, read when the model is built): LIVEAVATAR_KERNELS (auto/on/off, or
1/0), LIVEAVATAR_ATTENTION (auto/gather) and LIVEAVATAR_CUDA_GRAPHS (auto/off).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

CHOICES = {
    "kernels": ("auto", "on", "off"),
    "attention": ("auto", "gather"),
    "fp8_compute": ("auto", "dequantize"),
    "cuda_graphs": ("auto", "off"),
}
ENVIRONMENT = {"kernels": "LIVEAVATAR_KERNELS", "attention": "LIVEAVATAR_ATTENTION",
               "cuda_graphs": "LIVEAVATAR_CUDA_GRAPHS"}
_SPELLINGS = {"1": "on", "true": "on", "0": "off", "false": "off"}  # LIVEAVATAR_KERNELS=1/0 as before


@dataclass(frozen=True)
class RunOptions:
    kernels: str = "auto"
    attention: str = "auto"
    fp8_compute: str = "auto"
    cuda_graphs: str = "auto"

    def __post_init__(self):
        for field in fields(self):
            value, allowed = getattr(self, field.name), CHOICES[field.name]
            if value not in allowed:
                raise ValueError(f"{field.name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")

    @classmethod
    def from_env(cls, environ=None) -> "RunOptions":
        """The options the environment variables ask for (unset ones: auto); a ValueError naming
        the variable for a value that is not a choice."""
        environ = os.environ if environ is None else environ
        chosen = {}
        for name, variable in ENVIRONMENT.items():
            raw = environ.get(variable, "").strip().lower()
            if not raw:
                continue
            value = _SPELLINGS.get(raw, raw) if name == "kernels" else raw
            if value not in CHOICES[name]:
                raise ValueError(f"{variable}={environ[variable]!r}: must be one of {', '.join(CHOICES[name])}")
            chosen[name] = value
        return cls(**chosen)
