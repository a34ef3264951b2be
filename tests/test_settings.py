"""Per-model run options (liveavatar/settings.py): each model carries its own RunOptions and
Kernels, so two models in one process compute each as asked; bad values are refused clearly;
the loader node applies options to the model it has loaded without reloading it; a workflow
saved with the old `compile` widget opens with its values in the right widgets (web/js)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import fixture_sets, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_model, fixture_settings, fixture_weights, write_checkpoint
from liveavatar.dit import DiTConfig, LiveAvatarDiT
from liveavatar.kernels import Kernels
from liveavatar.layers import Linear
from liveavatar.loading import load_dit, quantize_fp8
from liveavatar.memory import TRIMS, ModelSpec, RunShape, _estimate
from liveavatar.placement import OneDevice, StepPerGPU
from liveavatar.sampler import stream
from liveavatar.settings import RunOptions

SET = fixture_sets("dit_streaming")[0].values[0]
NODE = shutil.which("node")
JS_TEST = Path(__file__).parent / "js" / "loader_widgets.test.mjs"


def interpreted_triton():
    """Skip unless the Triton kernels can run here without a GPU (conftest selects the interpreter)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter not selected (see conftest.py)")


# ---- the options ----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("kernels", "yes", "kernels must be one of 'auto', 'on', 'off', got 'yes'"),
    ("kernels", True, "kernels must be one of 'auto', 'on', 'off', got True"),
    ("attention", "flash", "attention must be one of 'auto', 'gather', got 'flash'"),
    ("fp8_compute", "fp8", "fp8_compute must be one of 'auto', 'dequantize', got 'fp8'"),
])
def test_bad_option_values_are_refused_with_the_choices(field, value, message):
    with pytest.raises(ValueError) as error:
        RunOptions(**{field: value})
    assert str(error.value) == message


def test_a_model_takes_only_run_options():
    with torch.device("meta"):
        model = LiveAvatarDiT(fixture_config(SET), RunOptions())
    with pytest.raises(TypeError, match="options must be a liveavatar.settings.RunOptions, got dict"):
        model.use_options({"kernels": "off"})


def test_the_environment_only_gives_the_defaults_of_a_model_built_without_options(monkeypatch):
    monkeypatch.setenv("LIVEAVATAR_KERNELS", "0")
    monkeypatch.setenv("LIVEAVATAR_ATTENTION", "gather")
    assert RunOptions.from_env() == RunOptions(kernels="off", attention="gather", fp8_compute="auto")
    built = fixture_model(SET)
    assert built.options == RunOptions(kernels="off", attention="gather")
    assert built.kernels.mode == "off"
    monkeypatch.setenv("LIVEAVATAR_KERNELS", "on")  # read when a model is built, not later
    assert built.options.kernels == "off" and built.kernels.mode == "off"
    assert LiveAvatarDiT(fixture_config(SET), RunOptions()).options == RunOptions()  # given options: env unread
    monkeypatch.setenv("LIVEAVATAR_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="LIVEAVATAR_KERNELS='sometimes': must be one of auto, on, off"):
        fixture_model(SET)
    monkeypatch.delenv("LIVEAVATAR_KERNELS")
    monkeypatch.delenv("LIVEAVATAR_ATTENTION")
    assert RunOptions.from_env() == RunOptions()


# ---- two models, one process ----------------------------------------------------------------
def one_clip(steps: int | None = None):
    """The fixture's settings for its first clip (two blocks), with `steps` denoising steps if given."""
    settings = fixture_settings(SET)
    settings.num_clip = 1
    settings.steps = steps or settings.steps
    return settings


def count_launches(monkeypatch) -> list:
    """Every Triton kernel launch (any model's) appended to the returned list."""
    from liveavatar import kernels_triton
    launches = []
    for name in ("modulated_norm", "rms_norm", "rms_norm_rope", "gated_add", "quantize_rows", "dequantize_tokens",
                 "merge_attention"):
        launch = getattr(kernels_triton, name)
        monkeypatch.setattr(kernels_triton, name, lambda *a, _launch=launch, _name=name, **k:
                            (launches.append(_name), _launch(*a, **k))[1])
    return launches


def test_two_models_with_kernels_on_and_off_interleaved(monkeypatch):
    """Blocks of a kernels-on and a kernels-off model made alternately equal each model's own
    blocks made alone; the kernels launch for the first model's blocks only (CPU: Triton's
    interpreter, about 0.1 s a launch, so one step per block). With the old process-wide switch
    the last setting won for both."""
    interpreted_triton()
    on, off = fixture_model(SET).use_options(RunOptions(kernels="on")), fixture_model(SET).use_options(
        RunOptions(kernels="off"))
    launches = count_launches(monkeypatch)
    alone = {}
    for name, model in (("on", on), ("off", off)):
        alone[name] = [block.latents for block in stream(model, fixture_inputs(SET), one_clip(steps=1))]
    assert launches and set(launches) >= {"modulated_norm", "rms_norm_rope", "gated_add"}
    runs = {name: stream(model, fixture_inputs(SET), one_clip(steps=1)) for name, model in (("on", on), ("off", off))}
    together = {"on": [], "off": []}
    for _ in range(len(alone["on"])):
        for name in ("on", "off"):
            before = len(launches)
            together[name].append(next(runs[name]).latents)
            assert (len(launches) > before) == (name == "on"), name
    for name in ("on", "off"):
        assert all(torch.equal(a, b) for a, b in zip(alone[name], together[name], strict=True)), name
    assert relative_l2(torch.cat(alone["on"], 1), torch.cat(alone["off"], 1)) < 1e-4  # both compute the same


def test_attention_gather_is_per_model_and_computes_the_same():
    """attention "gather" (one copied buffer, no log-sum-exp merge) on one model leaves the
    other's attention as it was; the two agree (fp32, CPU)."""
    from liveavatar import attention
    merged_calls = []
    real = attention.merge
    auto, gather = fixture_model(SET), fixture_model(SET).use_options(RunOptions(attention="gather"))
    try:
        attention.merge = lambda parts, kernels: (merged_calls.append(1), real(parts, kernels))[1]
        gathered = torch.cat([b.latents for b in stream(gather, fixture_inputs(SET), one_clip())], 1)
        cross_attention_merges = len(merged_calls)  # the prompt padding is merged either way
        merged = torch.cat([b.latents for b in stream(auto, fixture_inputs(SET), one_clip())], 1)
    finally:
        attention.merge = real
    assert len(merged_calls) > 2 * cross_attention_merges  # auto also merges the ring with the sink
    assert relative_l2(gathered, merged) < 1e-5


# ---- fp8 compute ------------------------------------------------------------------------------
def test_fp8_compute_dequantize_skips_the_fp8_products(monkeypatch):
    """An fp8 Linear with the kernels on and per-row fp8 products available (taken as available
    on the CPU): auto multiplies fp8 rows with torch._scaled_mm; dequantize never calls it and
    computes the bf16 product of the dequantised weight."""
    interpreted_triton()
    g = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(48, 96, generator=g) * 0.1, torch.randn(48, generator=g), torch.randn(32, 96, generator=g)
    products = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (products.append(1), real(*a, **k))[1])
    results = {}
    for choice in ("auto", "dequantize"):
        linear = Linear(96, 48)
        linear.weight.data, linear.scale_weight = quantize_fp8(weight)
        linear.bias.data = bias
        linear.kernels = Kernels("on", fp8_compute=choice)
        linear.kernels.probes[("row-wise fp8", torch.device("cpu"))] = True
        before = len(products)
        results[choice] = linear(linear.kernels.quantize_rows(x))
        assert (len(products) > before) == (choice == "auto"), choice
        assert linear.takes_fp8_rows == (choice == "auto")
    dequantised = (linear.weight.float() * linear.scale_weight.float()).to(torch.bfloat16)
    want = F.linear(linear.kernels.quantize_rows(x).dequantize(torch.bfloat16), dequantised, bias.to(torch.bfloat16))
    assert torch.equal(results["dequantize"], want)
    assert relative_l2(results["auto"].float(), results["dequantize"].float()) < 0.05


def test_memory_plan_follows_the_options():
    """fp8 weights on a GPU (the meta device stands in): fp8 rows only with the kernels and fp8
    products; dequantising holds two compute-dtype copies of the largest weight; gather
    copies the ring. Each costs more activation memory than the default."""
    cfg = DiTConfig()
    big, small = RunShape(48, 88, 48, 4), RunShape(32, 48, 48, 4)  # 704*384, 384*256

    def spec(**options):
        return ModelSpec.of_config(cfg, "fp8", OneDevice("meta"), 4, RunOptions(**options))

    default, no_kernels, dequantized, gathered = spec(), spec(kernels="off"), spec(fp8_compute="dequantize"), \
        spec(attention="gather")
    assert (default.fp8_rows, default.fp8_dequantized, default.gather_all) == (True, False, False)
    assert (no_kernels.fp8_rows, no_kernels.fp8_dequantized) == (False, False)
    assert (dequantized.fp8_rows, dequantized.fp8_dequantized) == (False, True)
    assert gathered.gather_all and gathered.fp8_rows

    def plan(s, shape=big, kv_fp8=False):
        return _estimate(s, shape, kv_fp8, TRIMS[0], None, {}, {})

    def activations(s, shape=big, kv_fp8=False):
        return plan(s, shape, kv_fp8).devices[0].parts["tick activations"]

    assert activations(no_kernels) > activations(default)
    assert activations(dequantized) > activations(no_kernels)
    # the copied ring: a bigger attention buffer at 384*256, fewer block-steps per call at 704*384
    assert activations(gathered, small) > activations(default, small)
    assert (plan(default).attention_items, plan(gathered).attention_items) == (4, 1)
    assert activations(gathered, small, kv_fp8=True) == activations(default, small, kv_fp8=True)  # fp8: copied anyway


# ---- changing a loaded model's options ----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(fixture_weights(SET), tmp_path_factory.mktemp("ckpt") / "dit.safetensors")


def test_use_options_changes_the_model_and_its_copies_without_reloading(checkpoint):
    model = load_dit(checkpoint, storage="fp32", placement=StepPerGPU(["cpu", "cpu"]), config=fixture_config(SET),
                     options=RunOptions(attention="gather"))
    copies = model.copies()
    assert len(copies) == 2 and all(c.options == RunOptions(attention="gather") for c in copies)
    weights = [p.data_ptr() for c in copies for p in c.parameters()]
    kept = model.kernels
    assert model.use_options(RunOptions(attention="gather")) is model and model.kernels is kept  # same: kept
    model.use_options(RunOptions(kernels="off", fp8_compute="dequantize"))
    fresh = model.kernels
    assert fresh is not kept and (fresh.mode, fresh.fp8_compute) == ("off", "dequantize")
    for copy in copies:
        assert copy.options == RunOptions(kernels="off", fp8_compute="dequantize") and copy.kernels is fresh
        assert all(m.kernels is fresh for m in copy.modules() if isinstance(getattr(m, "kernels", None), Kernels))
    assert [p.data_ptr() for c in copies for p in c.parameters()] == weights


# ---- the loader node ----------------------------------------------------------------------------
@pytest.fixture
def tiny_model_folders(tmp_path, monkeypatch):
    from liveavatar.testing import write_tiny_dit
    (tmp_path / "diffusion_models").mkdir()
    write_tiny_dit(tmp_path / "diffusion_models" / "dit.safetensors")
    monkeypatch.setenv("LIVEAVATAR_MODELS", str(tmp_path))
    return tmp_path


def test_loader_applies_options_to_its_loaded_model(tiny_model_folders, monkeypatch):
    import nodes.loader as loader_module
    settings = dict(model_name="dit.safetensors", lora_name="None", lora_strength=1.0, weight_dtype="fp32",
                    placement="one GPU", offload_blocks=0, kv_cache="auto")
    loader = loader_module.LiveAvatarModelLoader()
    default = loader.load(**settings)[0]
    assert default.dit.options == RunOptions() and default.options == RunOptions()
    opened = []
    monkeypatch.setattr(loader_module.Checkpoint, "open",
                        classmethod(lambda cls, path, real=loader_module.Checkpoint.open: opened.append(path) or real(path)))
    changed = loader.load(**settings, kernels="off", attention="gather", fp8_compute="dequantize")[0]
    assert not opened and changed.dit is default.dit  # the same weights, not reloaded
    assert changed.dit.options == RunOptions("off", "gather", "dequantize") and changed.dit.kernels.mode == "off"
    assert repr(changed) == ("LiveAvatarModel(dit.safetensors + None @ 1.0 (fp32, one GPU, kernels off, attention gather, "
                             "fp8_compute dequantize))")
    default.prepare()  # an older cached output runs with its own options again
    assert default.dit.options == RunOptions()
    changed.prepare()
    assert changed.dit.options == RunOptions("off", "gather", "dequantize")
    assert loader.load(**settings, compile=True)[0].dit is default.dit  # the old input: taken, ignored
    assert not opened
    with pytest.raises(ValueError, match="LiveAvatar model loader: kernels must be one of 'auto', 'on', 'off', "
                                         "got 'fast'"):
        loader.load(**settings, kernels="fast")


def test_loader_declares_the_options_after_warm_up():
    """Optional, after warm_up (a workflow saved before them keeps its values in place), each a
    list of the RunOptions choices with default auto and a tooltip; no compile input."""
    from nodes.loader import LiveAvatarModelLoader
    inputs = LiveAvatarModelLoader.INPUT_TYPES()
    assert "compile" not in inputs["required"] and "memory_cap_gib" in inputs["required"]
    assert list(inputs["optional"]) == ["warm_up", "kernels", "attention", "fp8_compute", "cuda_graphs"]
    for name, choices in (("kernels", ["auto", "on", "off"]), ("attention", ["auto", "gather"]),
                          ("fp8_compute", ["auto", "dequantize"]), ("cuda_graphs", ["auto", "off"])):
        spec, options = inputs["optional"][name]
        assert spec == choices and options["default"] == "auto" and options["tooltip"]


# ---- workflows saved with the old compile widget --------------------------------------------------
@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_old_loader_widget_lists_upgrade_in_node(tmp_path):
    """web/js/loader_widgets.js under Node's test runner, against the loader's real inputs."""
    from nodes.loader import LiveAvatarModelLoader
    definition = tmp_path / "loader.json"
    definition.write_text(json.dumps({"name": "LiveAvatarModelLoader", "input": LiveAvatarModelLoader.INPUT_TYPES()}))
    run = subprocess.run([NODE, "--test", str(JS_TEST)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LOADER_NODE_DEF": str(definition)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout
