"""Continuing a video from the sampler node: two queued runs over consecutive parts of the
speech (cut at a clip boundary) give the video one run over the whole speech gives."""
import pytest
import torch

from conftest import relative_l2
from liveavatar.loading import load_dit
from liveavatar.testing import tiny_dit_config, write_tiny_dit, write_tiny_vae
from liveavatar.vae import WanVAE, raw_to_normalised
from nodes import sampler as sampler_node
from nodes.loader import LiveAvatarModel

FRAMES = 24  # video frames per clip: 2 blocks


class Features:
    """A LIVEAVATAR_AUDIO stand-in: fixed per-frame features, already whole clips."""

    def __init__(self, features):
        self.features = features

    def per_frame(self, infer_frames):
        return self.features, self.features.shape[-1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    dit = load_dit(write_tiny_dit(folder / "dit.safetensors"), storage="fp32")
    vae = WanVAE.load(write_tiny_vae(folder / "vae.safetensors"), device="cpu")
    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(3)
    audio = torch.randn(cfg.audio_layers, cfg.audio_dim, 3 * FRAMES, generator=g)
    text = [[torch.randn(1, 12, cfg.text_dim, generator=g), {}]]
    image = torch.rand(1, 96, 64, 3, generator=g)
    # The portrait is encoded once here (73 frames through the VAE, slow on a CPU) and handed
    # to every run: what is tested is the continuation, not the encode.
    portrait = sampler_node.encode_portrait(vae, sampler_node.prepare_portrait(sampler_node.image_tensor(image), 64 * 96))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler_node, "encode_portrait", lambda vae, image: portrait)
        yield dit, vae, audio, text, image


def sample(parts, audio, dit=None, **options):
    model_dit, vae, _, text, image = parts
    model = LiveAvatarModel(dit or model_dit, False, "tiny")
    return sampler_node.LiveAvatarSampler().sample(model, text, image, vae, Features(audio), "custom", 64, 96,
                                                   FRAMES, 0, 3, 5, **options)[0]


@pytest.fixture(scope="module")
def runs(parts):
    """The whole speech in one run, and its first clip in a run that keeps its state."""
    audio = parts[2]
    return sample(parts, audio), sample(parts, audio[..., :FRAMES], keep_state=True)


def test_continued_runs_equal_one_run(parts, runs):
    whole, first = runs
    assert first["liveavatar"]["state"] in sampler_node._kept
    second = sample(parts, parts[2][..., FRAMES:], continue_from=first)
    assert not sampler_node._kept  # the kept state was used up (and not kept again)
    joined = torch.cat([first["samples"], second["samples"]], dim=2)
    assert joined.shape == whole["samples"].shape
    assert relative_l2(joined, whole["samples"]) <= 1e-5
    # the decoder of the second part is primed with the first part's last latents
    primed = second["liveavatar"]["motion_latents"]
    assert second["liveavatar"]["continues"] and primed.shape[1] == min(7, first["samples"].shape[2])
    assert relative_l2(primed, raw_to_normalised(first["samples"][0, :, -primed.shape[1]:])) < 1e-6


def test_continuing_without_the_kept_state_is_approximate(parts, runs):
    """The state is gone (used up above; likewise after a reload or a restart): continue from
    the LATENT's last latents and reference. Same length, close to but not the exact video."""
    whole, first = runs
    sampler_node.release_kept()
    second = sample(parts, parts[2][..., FRAMES:], continue_from=first)
    exact_tail = whole["samples"][:, :, first["samples"].shape[2]:]
    assert second["samples"].shape == exact_tail.shape
    assert torch.isfinite(second["samples"]).all()
    assert relative_l2(second["samples"], exact_tail) > 1e-3  # another history: not the exact video


def test_a_new_kept_state_releases_the_old_one(parts):
    audio = parts[2][..., :FRAMES]
    first = sample(parts, audio, keep_state=True)
    old = sampler_node._kept[first["liveavatar"]["state"]]
    second = sample(parts, audio, keep_state=True)
    assert list(sampler_node._kept) == [second["liveavatar"]["state"]]
    assert old.caches == []  # closed: its GPU memory is back
    sampler_node.release_kept()


def test_decoding_a_continuation_gives_the_missing_frames(parts):
    """Part 2's decode is primed with the end of part 1 and drops nothing: parts 1 + 2 have
    exactly the frames of the whole video (values approximate: the VAE's causal cache is
    rebuilt from 7 latents, not carried)."""
    from liveavatar.decoding import VideoDecoder
    vae = parts[1]
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
