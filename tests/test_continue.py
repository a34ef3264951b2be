"""Continuing a video from the sampler node: two queued runs over consecutive parts of the
speech (cut at a clip boundary) give the video one run over the whole speech gives; the state
that makes it exact lives with the LATENT and the loaded model, not in the module; whatever
keeps it from being used is said, and the approximate continuation runs instead."""
import gc

import pytest
import torch

from conftest import relative_l2
from liveavatar.testing import tiny_dit_config, write_tiny_dit, write_tiny_lora, write_tiny_vae
from liveavatar.vae import WanVAE, raw_to_normalised
from nodes import sampler as sampler_node
from nodes import stream_run
from nodes.loader import LiveAvatarModelLoader

FRAMES = 24  # video frames per clip: 2 blocks
SIZE = (64, 96)  # custom width, height: 8x12 latents


class Features:
    """A LIVEAVATAR_AUDIO stand-in: fixed per-frame features, already whole clips."""

    def __init__(self, features):
        self.features = features

    def per_frame(self, infer_frames):
        return self.features, self.features.shape[-1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The loader's model (tiny DiT + LoRA, fp32) at strengths 1.0 and 0.5 (one set of weights),
    a VAE, three clips of audio features, a prompt and a portrait."""
    folder = tmp_path_factory.mktemp("tiny")
    for sub in ("diffusion_models", "loras"):
        (folder / sub).mkdir()
    write_tiny_dit(folder / "diffusion_models" / "dit.safetensors")
    write_tiny_lora(folder / "loras" / "lora.safetensors")
    vae = WanVAE.load(write_tiny_vae(folder / "vae.safetensors"), device="cpu")
    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(3)
    audio = torch.randn(cfg.audio_layers, cfg.audio_dim, 3 * FRAMES, generator=g)
    text = [[torch.randn(1, 12, cfg.text_dim, generator=g), {}]]
    image = torch.rand(1, 96, 64, 3, generator=g)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIVEAVATAR_MODELS", str(folder))
        loader = LiveAvatarModelLoader()
        models = {s: loader.load("dit.safetensors", "lora.safetensors", s, "fp32", "one GPU", 0, "bf16")[0]
                  for s in (1.0, 0.5)}
        # The portrait is encoded once (73 frames through the VAE, slow on a CPU) and handed to
        # every run that encodes it: what is tested is the continuation, not the encode.
        encoded = stream_run.encode_portrait(vae, stream_run.prepare_portrait(
            stream_run.image_tensor(image), SIZE[0] * SIZE[1]))
        patch.setattr(stream_run, "encode_portrait", lambda vae, portrait: encoded)
        yield dict(models=models, vae=vae, audio=audio, text=text, image=image)


def sample(parts, audio, strength=1.0, **options):
    """The sampler node's LATENT and UI (seed 5, 3 steps, FRAMES frames per clip) for audio
    features (per-frame tensor, or LiveAvatar Audio Encode's output)."""
    settings = dict(size="custom", width=SIZE[0], height=SIZE[1], infer_frames=FRAMES, num_clip=0, sample_steps=3,
                    seed=5, positive=parts["text"], image=parts["image"])
    settings.update(options)
    features = Features(audio) if isinstance(audio, torch.Tensor) else audio
    out = sampler_node.LiveAvatarSampler().sample(parts["models"][strength], vae=parts["vae"],
                                                  audio_features=features, **settings)
    return out["result"][0], out["ui"]


def kept(parts):
    return parts["models"][1.0].weights.kept


@pytest.fixture(scope="module")
def whole(parts):
    """One run over the whole speech."""
    return sample(parts, parts["audio"])[0]


def continued(parts, first, **options):
    return sample(parts, parts["audio"][..., FRAMES:], continue_from=first, **options)


def test_continued_runs_equal_one_run(parts, whole):
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    assert len(kept(parts)) == 1 and "state" in first["liveavatar"]
    second, ui = continued(parts, first)
    assert len(kept(parts)) == 0  # the kept state was used up (and not kept again)
    assert second["liveavatar"]["continuation"] == "exact" and "continued exactly" in ui["text"][0]
    joined = torch.cat([first["samples"], second["samples"]], dim=2)
    assert joined.shape == whole["samples"].shape
    assert relative_l2(joined, whole["samples"]) <= 1e-5
    # the decoder of the second part is primed with the first part's last latents
    primed = second["liveavatar"]["motion_latents"]
    assert second["liveavatar"]["continues"] and primed.shape[1] == min(7, first["samples"].shape[2])
    assert relative_l2(primed, raw_to_normalised(first["samples"][0, :, -primed.shape[1]:])) < 1e-6


def test_an_unrelated_run_in_between_keeps_it_exact(parts, whole):
    """Other runs (another speech, no keep_state; another kept state) leave the kept state alone."""
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    other, _ = sample(parts, parts["audio"][..., FRAMES:2 * FRAMES], seed=9)
    also_kept, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True, seed=11)
    assert len(kept(parts)) == 2
    second, _ = continued(parts, first)
    assert second["liveavatar"]["continuation"] == "exact"
    assert relative_l2(torch.cat([first["samples"], second["samples"]], dim=2), whole["samples"]) <= 1e-5
    del also_kept  # its LATENT dropped: its state goes with it
    gc.collect()
    assert len(kept(parts)) == 0 and other["samples"].shape[2] == first["samples"].shape[2]


def test_a_dropped_latent_releases_its_state(parts):
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    streamer = kept(parts)._states[first["liveavatar"]["state"].token]
    del first
    gc.collect()
    assert len(kept(parts)) == 0 and streamer.caches == []  # closed: its GPU memory is back


def test_continuing_without_the_kept_state_is_approximate_and_said(parts, whole):
    """No kept state (keep_state off): continue from the LATENT's last latents and reference.
    Same length, close to but not the exact video; the node and its LATENT say which it ran."""
    first, _ = sample(parts, parts["audio"][..., :FRAMES])
    second, ui = continued(parts, first)
    info = second["liveavatar"]
    assert info["continuation"] == "approximate" and "keep_state was off" in info["note"]
    assert "continued approximately" in ui["text"][0]
    exact_tail = whole["samples"][:, :, first["samples"].shape[2]:]
    assert second["samples"].shape == exact_tail.shape
    assert relative_l2(second["samples"], exact_tail) > 1e-3  # another history: not the exact video


CHANGES = {  # option of the second run -> what the note names
    "lora_strength": (dict(strength=0.5), "LoRA strength (1.0 -> 0.5)"),
    "prompt": (dict(positive="other"), "prompt"),
    "portrait": (dict(image="other"), "portrait image"),
    "size": (dict(width=128), "size (64x64 -> 64x128)"),
    "steps": (dict(sample_steps=2), "sample_steps (3 -> 2)"),
    "infer_frames": (dict(infer_frames=12), "infer_frames (24 -> 12)"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_setting_runs_approximately_and_keeps_the_state(change, parts, whole):
    """A continuation with another LoRA strength (same weights, set to 0.5), prompt, portrait,
    size, steps or clip length cannot use the state: it says so and what changed; the state
    stays kept, and a later run that matches again (the LoRA back at 1.0) continues exactly."""
    options, says = CHANGES[change]
    g = torch.Generator().manual_seed(7)
    if options.get("positive") == "other":
        options = dict(positive=[[torch.randn(1, 12, tiny_dit_config().text_dim, generator=g), {}]])
    if options.get("image") == "other":
        options = dict(image=torch.rand(1, 96, 64, 3, generator=g))
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    second, ui = continued(parts, first, **options)
    info = second["liveavatar"]
    assert info["continuation"] == "approximate" and says in info["note"] and says in ui["text"][0]
    assert len(kept(parts)) == 1
    if change == "lora_strength":  # back at 1.0 (the weights set again, bit for bit): exact again
        third, _ = continued(parts, first)
        assert third["liveavatar"]["continuation"] == "exact"
        assert relative_l2(torch.cat([first["samples"], third["samples"]], dim=2), whole["samples"]) <= 1e-5


def test_a_state_used_or_released_is_said(parts):
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    continued(parts, first)
    again, _ = continued(parts, first)  # the stream moved on with the first continuation
    assert again["liveavatar"]["continuation"] == "approximate"
    assert "an earlier continuation used it" in again["liveavatar"]["note"]
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    kept(parts).release_all("ComfyUI unloaded the model to free memory")  # what the model's patcher does on unload
    freed, _ = continued(parts, first)
    assert "ComfyUI unloaded the model to free memory" in freed["liveavatar"]["note"]


def test_another_model_cannot_continue_exactly(parts, tmp_path, monkeypatch):
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    (tmp_path / "diffusion_models").mkdir()
    write_tiny_dit(tmp_path / "diffusion_models" / "dit.safetensors")
    monkeypatch.setenv("LIVEAVATAR_MODELS", str(tmp_path))
    reloaded = LiveAvatarModelLoader().load("dit.safetensors", "None", 1.0, "fp32", "one GPU", 0, "bf16")[0]
    parts = {**parts, "models": {1.0: reloaded}}
    second, _ = continued(parts, first)
    assert second["liveavatar"]["continuation"] == "approximate"
    assert "another model" in second["liveavatar"]["note"]


def test_a_new_seed_is_said_not_silently_ignored(parts):
    first, _ = sample(parts, parts["audio"][..., :FRAMES], keep_state=True)
    second, ui = continued(parts, first, seed=6)
    assert second["liveavatar"]["continuation"] == "exact"
    assert "the seed input (6) is not used" in ui["text"][0]


@pytest.mark.parametrize("latent, says", [
    ({"samples": torch.zeros(1, 4, 8, 12)}, "latents of shape (1, 4, 8, 12)"),  # an image LATENT (VAEEncode)
    ({"samples": torch.zeros(1, 16, 0, 8, 12), "liveavatar": {"fps": 25}}, "continue_from is empty"),
    ({"samples": torch.zeros(1, 16, 6, 8, 12)}, "not a LATENT from LiveAvatar"),  # e.g. another video model's
    ("latent", "continue_from must be a LATENT"),
])
def test_foreign_or_empty_latent_is_a_clear_error(latent, says, parts):
    with pytest.raises(ValueError, match="continue_from") as error:
        continued(parts, latent)
    assert says in str(error.value)


def test_features_of_another_width_are_a_clear_error(parts):
    """Features of another encoder (e.g. wav2vec2-base: 13 states of 768) are refused before
    any work, for a first run as for a continuation."""
    cfg = tiny_dit_config()
    other = torch.randn(cfg.audio_layers, cfg.audio_dim + 8, FRAMES)
    with pytest.raises(ValueError, match="audio_features hold") as error:
        sample(parts, other)
    assert f"{cfg.audio_layers} of width {cfg.audio_dim}" in str(error.value)


def test_decoding_a_continuation_gives_the_missing_frames(parts):
    """Part 2's decode is primed with the end of part 1 and drops nothing: parts 1 + 2 have
    exactly the frames of the whole video (values approximate: the VAE's causal cache is
    rebuilt from 7 latents, not carried)."""
    from liveavatar.decoding import VideoDecoder
    vae = parts["vae"]
    g = torch.Generator().manual_seed(4)
    motion, latents = torch.randn(16, 19, 8, 8, generator=g), torch.randn(16, 24, 8, 8, generator=g)

    def decode(decoder, part):
        return torch.cat([decoder.decode(part[:, i:i + 3]) for i in range(0, part.shape[1], 3)], dim=1)

    whole = decode(VideoDecoder(vae, motion), latents)
    first = decode(VideoDecoder(vae, motion), latents[:, :12])
    second = decode(VideoDecoder(vae, latents[:, 5:12], drop_first=0), latents[:, 12:])
    assert first.shape[1] + second.shape[1] == whole.shape[1] == 4 * 24 - 3
    assert second.shape[1] == 4 * 12
    assert relative_l2(second, whole[:, first.shape[1]:]) < 0.5


# ---- the speech at the join ------------------------------------------------------------------
RATE = 48000  # an AAC rate: the speech is muxed as given, sample for sample


@pytest.fixture(scope="module")
def speech(parts, tmp_path_factory):
    """A speech of two clips (1.92 s at 24 frames per clip), cut at the clip boundary into two
    parts as the continue workflow cuts it, each encoded by LiveAvatar Audio Encode."""
    from liveavatar.audio import Wav2Vec2Encoder
    from liveavatar.testing import write_tiny_wav2vec2
    from nodes.audio import LiveAvatarAudioEncode
    n = 2 * FRAMES * RATE // 25
    t = torch.arange(n) / RATE
    wave = 0.4 * torch.sin(2 * torch.pi * 170 * t) * (0.6 + 0.4 * torch.sin(2 * torch.pi * 3 * t))
    cut = n // 2
    audio = {name: {"waveform": w.reshape(1, 1, -1), "sample_rate": RATE}
             for name, w in (("whole", wave), ("part1", wave[:cut]), ("part2", wave[cut:]))}
    encoder = Wav2Vec2Encoder.load(write_tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "w2v.safetensors"))
    features = {name: LiveAvatarAudioEncode().encode(a, encoder, FRAMES)[0] for name, a in audio.items()}
    return audio, features


class Recorded:
    """Records the speech samples handed to the mp4 muxer (PyAV's AudioFrame.from_ndarray), in
    order, while writing for real."""

    def __init__(self, av):
        self.real, self.arrays = av.AudioFrame, []

    def from_ndarray(self, array, format, layout):
        self.arrays.append(array.copy())
        return self.real.from_ndarray(array, format=format, layout=layout)

    def take(self):
        samples = torch.from_numpy(__import__("numpy").concatenate([a.reshape(-1) for a in self.arrays]))
        self.arrays = []
        return samples


@pytest.fixture
def quick_decode(parts, monkeypatch):
    """The VAE's streaming decode replaced by its frame arithmetic (the first latent of a
    stream gives 1 frame, every later one 4; see test_vae for the real one): what is checked
    here is which frames and which speech each part gets, not pixels."""
    class FrameCount:
        def __init__(self):
            self.started = False

        def decode(self, latents, clamp=True, on_step=None):
            frames = 4 * latents.shape[1] - (0 if self.started else 3)
            self.started = True
            return torch.zeros(3, frames, 8 * latents.shape[2], 8 * latents.shape[3])

    monkeypatch.setattr(parts["vae"], "stream_decoder", FrameCount)


def decoded_mp4(latent, audio, recorder, prefix):
    """The decode node's mp4 of a part: (frames written, the speech muxed with them)."""
    from nodes.decode import LiveAvatarDecode
    frames, _ = LiveAvatarDecode().decode(latent, None, True, True, prefix, audio=audio)["result"]
    return len(frames), recorder.take()


def test_continuing_loses_no_speech_at_the_join(parts, speech, quick_decode, tmp_path, monkeypatch):
    """Part 1 (the speech up to its clip boundary, kept state) and part 2 (the rest, continued)
    decoded to mp4s with their own audio: together they have the frames and the speech the mp4
    of one run over the whole speech has, sample for sample. Part 1's video ends 3 frames
    (0.12 s) before its clip does; those 0.12 s of speech open part 2."""
    import av
    import nodes.decode as decode_node
    audio, features = speech
    monkeypatch.setenv("LIVEAVATAR_OUTPUT", str(tmp_path))
    monkeypatch.setattr(decode_node, "loaded_vae", lambda vae: parts["vae"])
    recorder = Recorded(av)
    monkeypatch.setattr(av, "AudioFrame", recorder)
    whole, _ = sample(parts, features["whole"])
    first, _ = sample(parts, features["part1"], keep_state=True)
    second, _ = sample(parts, features["part2"], continue_from=first)
    assert second["liveavatar"]["continuation"] == "exact"
    whole_frames, whole_speech = decoded_mp4(whole, audio["whole"], recorder, "whole")
    frames1, speech1 = decoded_mp4(first, audio["part1"], recorder, "part1")
    frames2, speech2 = decoded_mp4(second, audio["part2"], recorder, "part2")
    # hand-derived: 2 clips of 24 frames, the first 3 dropped; part 1 = 6 latents -> 21 frames
    assert (whole_frames, frames1, frames2) == (45, 21, 24)
    assert torch.equal(torch.cat([speech1, speech2]), whole_speech)
    assert whole_speech.shape[0] == 45 * RATE // 25
    lead = audio["part1"]["waveform"].reshape(-1)[21 * RATE // 25:]  # part 1's speech after its video
    assert lead.shape[0] == 3 * RATE // 25 and torch.equal(speech2[:lead.shape[0]], lead)


def test_live_video_continues_a_sampler_run_with_the_speech_at_the_join(parts, speech, quick_decode, tmp_path,
                                                                      monkeypatch):
    """Live Video shares the run: it continues a kept state exactly, decodes the part from the
    end of the previous one, and its mp4 starts with the previous part's last 0.12 s of speech."""
    import av
    from nodes.live import LiveAvatarLiveVideo
    audio, features = speech
    monkeypatch.setenv("LIVEAVATAR_OUTPUT", str(tmp_path))
    first, _ = sample(parts, features["part1"], keep_state=True)
    recorder = Recorded(av)
    monkeypatch.setattr(av, "AudioFrame", recorder)
    out = LiveAvatarLiveVideo().generate(
        parts["models"][1.0], parts["text"], parts["image"], parts["vae"], features["part2"], "custom", *SIZE, FRAMES,
        0, 3, 5, audio["part2"], "live", return_frames=True, continue_from=first, keep_state=True)
    frames, _, latent = out["result"]
    info = latent["liveavatar"]
    assert info["continuation"] == "exact" and "state" in info and len(kept(parts)) == 1
    assert len(frames) == 24 and "continued exactly" in out["ui"]["text"][0]
    written = recorder.take()
    lead = audio["part1"]["waveform"].reshape(-1)[21 * RATE // 25:]
    assert torch.equal(written[:lead.shape[0]], lead)
    assert torch.equal(written[lead.shape[0]:lead.shape[0] + 1000], audio["part2"]["waveform"].reshape(-1)[:1000])
