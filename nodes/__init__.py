"""ComfyUI nodes of the LiveAvatar pack (classic node API; importable without ComfyUI)."""
from .audio import LiveAvatarAudioEncode
from .decode import LiveAvatarDecode
from .live import LiveAvatarLiveVideo
from .loader import LiveAvatarModelLoader
from .sampler import LiveAvatarSampler
from .session import LiveAvatarSession

NODE_CLASS_MAPPINGS = {
    "LiveAvatarModelLoader": LiveAvatarModelLoader,
    "LiveAvatarAudioEncode": LiveAvatarAudioEncode,
    "LiveAvatarSampler": LiveAvatarSampler,
    "LiveAvatarDecode": LiveAvatarDecode,
    "LiveAvatarLiveVideo": LiveAvatarLiveVideo,
    "LiveAvatarSession": LiveAvatarSession,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LiveAvatarModelLoader": "LiveAvatar Model Loader",
    "LiveAvatarAudioEncode": "LiveAvatar Audio Encode",
    "LiveAvatarSampler": "LiveAvatar Sampler",
    "LiveAvatarDecode": "LiveAvatar Decode (streaming)",
    "LiveAvatarLiveVideo": "LiveAvatar Live Video",
    "LiveAvatarSession": "LiveAvatar Live Session",
}
