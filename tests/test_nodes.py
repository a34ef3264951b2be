"""Node adapters outside ComfyUI: declarations, conditioning layout, cancel, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

import nodes
from conftest import fixture_sets
from dit_fixture import fixture_inputs, fixture_model, fixture_settings, stream_clips
from nodes import host
from nodes.conditioning import text_embeddings
from liveavatar.sampler import Streamer
from nodes.sampler import run_stream


@pytest.mark.parametrize("name", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_classic_api_with_tooltips_everywhere(name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    assert cls.CATEGORY == "LiveAvatar" and callable(getattr(cls, cls.FUNCTION))
    assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS and cls.DESCRIPTION
    spec = cls.INPUT_TYPES()
    for section in spec.values():
        for input_name, (kind, *options) in section.items():
            assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_umt5_conditioning_gives_real_tokens_only():
    """ComfyUI pads umt5 output to 512 with zeroed rows; the DiT wants the real tokens."""
    real = torch.randn(9, 4096)
    padded = torch.zeros(1, 512, 4096)
    padded[0, :9] = real
    assert torch.equal(text_embeddings([[padded, {}]], 512), real)
    mask = torch.zeros(1, 512, dtype=torch.long)
    mask[0, :9] = 1
    assert torch.equal(text_embeddings([[padded, {"attention_mask": mask}]], 512), real)
    assert text_embeddings([[torch.randn(1, 600, 4096), {}]], 512).shape == (512, 4096)


def test_wrong_conditioning_is_a_clear_error():
    with pytest.raises(ValueError, match="umt5-xxl"):
        text_embeddings([[torch.zeros(1, 77, 768), {}]], 512)
    with pytest.raises(ValueError, match="empty CONDITIONING"):
        text_embeddings([], 512)


def test_cancel_between_block_steps_frees_caches_and_keeps_model_usable(monkeypatch):
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    model, inputs, settings = fixture_model(set_dir), fixture_inputs(set_dir), fixture_settings(set_dir)
    calls = {"n": 0}

    class Cancelled(Exception):
        pass

    def cancel_on_fifth():
        calls["n"] += 1
        if calls["n"] == 5:
            raise Cancelled()

    closed = []
    from liveavatar import sampler
    original_close = sampler.Streamer.close
    monkeypatch.setattr(sampler.Streamer, "close", lambda self: (closed.append(True), original_close(self)))
    monkeypatch.setattr(host, "check_interrupted", cancel_on_fifth)
    with pytest.raises(Cancelled):
        run_stream(Streamer(model, inputs, settings))
    assert calls["n"] == 5 and closed == [True]
    monkeypatch.setattr(host, "check_interrupted", lambda: None)
    again = run_stream(Streamer(model, inputs, settings))  # same model, fresh caches: same result as never cancelled
    reference = torch.cat(list(stream_clips(model, inputs, settings)), dim=1)
    assert torch.equal(again, reference)


def test_sampler_previews_each_block_from_its_cpu_copy(monkeypatch):
    """The sampler's blocks reach the preview and the LATENT as float32 CPU copies (made alongside
    the next tick on a GPU: overlap.latents_on_cpu), one preview per block, in order."""
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    model, inputs, settings = fixture_model(set_dir), fixture_inputs(set_dir), fixture_settings(set_dir)
    previewed = []
    monkeypatch.setattr(host, "latent_previewer", lambda: previewed.append)
    latents = run_stream(Streamer(model, inputs, settings))
    reference = torch.cat(list(stream_clips(model, inputs, settings)), dim=1).float()
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in previewed)
    assert torch.equal(torch.cat(previewed, dim=1), reference) and torch.equal(latents, reference)


def test_latent_preview_gets_the_first_frame_where_the_previewer_runs(monkeypatch):
    """ComfyUI's latent->RGB projection takes the sampler's CPU copies as they are; another
    previewer (TAESD: a network on ComfyUI's device) gets them on that device. Both get the
    first latent frame as [1, 16, 1, h, w] float32, with the "JPEG" format."""
    import sys
    import types
    seen = []

    class Latent2RGBPreviewer:
        def decode_latent_to_preview_image(self, preview_format, x0):
            seen.append(("projection", preview_format, x0))

    class TAESDPreviewerImpl:
        def decode_latent_to_preview_image(self, preview_format, x0):
            seen.append(("network", preview_format, x0))

    latents = torch.randn(16, 3, 4, 6, dtype=torch.float64)
    for previewer in (Latent2RGBPreviewer(), TAESDPreviewerImpl()):
        module = types.SimpleNamespace(Latent2RGBPreviewer=Latent2RGBPreviewer,
                                       get_previewer=lambda device, latent_format, p=previewer: p)
        monkeypatch.setitem(sys.modules, "latent_preview", module)
        monkeypatch.setitem(sys.modules, "comfy.latent_formats", types.SimpleNamespace(Wan21=object))
        monkeypatch.setattr(host, "torch_device", lambda: torch.device("meta"))
        host.latent_previewer()(latents)
    (kind, fmt, x0), (kind2, fmt2, x1) = seen
    assert (kind, fmt, x0.device.type, x0.dtype) == ("projection", "JPEG", "cpu", torch.float32)
    assert torch.equal(x0, latents[None, :, :1].float())
    assert (kind2, fmt2, x1.device.type, tuple(x1.shape)) == ("network", "JPEG", "meta", (1, 16, 1, 4, 6))


def test_loader_reports_a_non_s2v_file_clearly(tmp_path, monkeypatch):
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    save_file({"model.diffusion_model.patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)}, str(folder / "wan_t2v.safetensors"))
    monkeypatch.setenv("LIVEAVATAR_MODELS", str(tmp_path))
    loader = nodes.LiveAvatarModelLoader()
    assert "wan_t2v.safetensors" in loader.INPUT_TYPES()["required"]["model_name"][0]
    with pytest.raises(ValueError, match="not a Wan2.2-S2V diffusion model"):
        loader.load("wan_t2v.safetensors", "None", 1.0, "bf16", "one GPU", 0, "auto", False)


def test_sharded_placement_needs_several_gpus(tmp_path, monkeypatch):
    from nodes.loader import make_placement
    from liveavatar.dit import DiTConfig
    if torch.cuda.device_count() > 1:
        pytest.skip("machine has several GPUs")
    with pytest.raises(ValueError, match="at least 2 visible GPUs"):
        make_placement("sharded over GPUs", 0, DiTConfig())
