"""LiveAvatar engine: plain PyTorch, importable without ComfyUI.

Typical use (a complete program that runs: docs/python_api.md):

    import liveavatar as la
    dit = la.load_dit("wan2.2_s2v_14B_bf16.safetensors", lora="liveavatar.safetensors",
                      placement=la.OneDevice("cuda"))
    streamer = la.Streamer(dit, la.StreamInputs(text, ref_latent, motion_latents, audio_features),
                           la.StreamSettings(infer_frames=48, steps=4, seed=42))
    for block in streamer.blocks():   # 3 clean latent frames at a time
        ...
"""
from .loading import CheckpointError, load_dit
from .overlap import decode_alongside
from .placement import Offload, OneDevice, Sharded, StepPerGPU
from .sampler import Block, StreamInputs, StreamSettings, Streamer, flow_schedule, stream
from .settings import RunOptions

__all__ = ["CheckpointError", "load_dit", "decode_alongside", "Offload", "OneDevice", "Sharded", "StepPerGPU", "Block",
           "StreamInputs", "StreamSettings", "Streamer", "flow_schedule", "stream", "RunOptions"]
