// Unit test of the loader's old-workflow upgrade (web/js/loader_widgets.js): widgets made as
// ComfyUI makes them (one per input, required then optional, holding its default), then set
// from a saved list as ComfyUI sets them, then upgraded.
// Run: node --test tests/js/loader_widgets.test.mjs (tests/test_settings.py does, under pytest,
// with LOADER_NODE_DEF naming a JSON file of the loader's real INPUT_TYPES; without it a copy
// of the input names and defaults below is used).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";

// Imported from its source text, so Node needs no package.json to read it as a module.
const source = await readFile(new URL("../../web/js/loader_widgets.js", import.meta.url), "utf8");
const { inputDefaults, isOldLoaderList, restoreLoaderWidgets, withoutCompile } = await import(
  `data:text/javascript,${encodeURIComponent(source)}`);

const COPY = {
  name: "LiveAvatarModelLoader",
  input: {
    required: {
      model_name: [["wan2.2_s2v_14B_bf16.safetensors"], {}], lora_name: [["None", "liveavatar.safetensors"], {}],
      lora_strength: ["FLOAT", { default: 1.0 }], weight_dtype: [["bf16", "fp8_e4m3fn", "fp16", "fp32"], { default: "bf16" }],
      placement: [["one GPU", "sharded over GPUs"], { default: "one GPU" }], offload_blocks: ["INT", { default: 20 }],
      kv_cache: [["auto", "bf16", "fp8"], { default: "auto" }], memory_cap_gib: ["FLOAT", { default: 0.0 }],
    },
    optional: {
      warm_up: [["auto", "off", "384*256", "704*384"], { default: "auto" }],
      kernels: [["auto", "on", "off"], { default: "auto" }], attention: [["auto", "gather"], { default: "auto" }],
      fp8_compute: [["auto", "dequantize"], { default: "auto" }], cuda_graphs: [["auto", "off"], { default: "auto" }],
    },
  },
};
const nodeData = process.env.LOADER_NODE_DEF ? JSON.parse(await readFile(process.env.LOADER_NODE_DEF, "utf8")) : COPY;
const defaults = inputDefaults(nodeData);
const names = [...Object.keys(nodeData.input.required), ...Object.keys(nodeData.input.optional ?? {})];

// What ComfyUI's LGraphNode.configure does before onConfigure: the saved values into the
// widgets in order, as many as there are values.
function configuredWidgets(saved) {
  const widgets = names.map((name) => ({ name, value: defaults[name] }));
  saved.forEach((value, i) => { if (widgets[i]) widgets[i].value = value; });
  return widgets;
}

const valuesOf = (widgets) => Object.fromEntries(widgets.map((w) => [w.name, w.value]));
const MODEL = ["wan2.2_s2v_14B_bf16.safetensors", "liveavatar.safetensors", 0.75, "fp8_e4m3fn", "one GPU", 12, "fp8"];
const SET_BEFORE = { model_name: MODEL[0], lora_name: MODEL[1], lora_strength: 0.75, weight_dtype: "fp8_e4m3fn",
                     placement: "one GPU", offload_blocks: 12, kv_cache: "fp8" };

test("the loader's inputs are the old ones without compile, then kernels, attention, fp8_compute, cuda_graphs", () => {
  assert.deepEqual(names, ["model_name", "lora_name", "lora_strength", "weight_dtype", "placement", "offload_blocks",
                           "kv_cache", "memory_cap_gib", "warm_up", "kernels", "attention", "fp8_compute",
                           "cuda_graphs"]);
  assert.deepEqual([defaults.kernels, defaults.attention, defaults.fp8_compute, defaults.cuda_graphs, defaults.warm_up],
                   ["auto", "auto", "auto", "auto", "auto"]);
});

test("a list saved with compile and warm_up: every value in its widget, the new ones auto", () => {
  const saved = [...MODEL, true, 24.5, "704*384"];
  const widgets = configuredWidgets(saved);
  assert.equal(valuesOf(widgets).memory_cap_gib, true); // what ComfyUI alone leaves: shifted
  assert.equal(restoreLoaderWidgets(widgets, saved, defaults), true);
  assert.deepEqual(valuesOf(widgets), { ...SET_BEFORE, memory_cap_gib: 24.5, warm_up: "704*384", kernels: "auto",
                                        attention: "auto", fp8_compute: "auto", cuda_graphs: "auto" });
});

test("lists from before warm_up and before memory_cap_gib", () => {
  let saved = [...MODEL, false, 8];
  let widgets = configuredWidgets(saved);
  assert.equal(restoreLoaderWidgets(widgets, saved, defaults), true);
  assert.deepEqual(valuesOf(widgets), { ...SET_BEFORE, memory_cap_gib: 8, warm_up: "auto", kernels: "auto",
                                        attention: "auto", fp8_compute: "auto", cuda_graphs: "auto" });
  saved = [...MODEL, false];
  widgets = configuredWidgets(saved);
  assert.equal(restoreLoaderWidgets(widgets, saved, defaults), true);
  assert.deepEqual(valuesOf(widgets), { ...SET_BEFORE, memory_cap_gib: 0, warm_up: "auto", kernels: "auto",
                                        attention: "auto", fp8_compute: "auto", cuda_graphs: "auto" });
});

test("a current list is left as ComfyUI set it", () => {
  const saved = [...MODEL, 16, "off", "off", "gather", "dequantize"];
  const widgets = configuredWidgets(saved);
  const before = valuesOf(widgets);
  assert.equal(isOldLoaderList(saved), false);
  assert.equal(restoreLoaderWidgets(widgets, saved, defaults), false);
  assert.deepEqual(valuesOf(widgets), before);
  assert.equal(before.kernels, "off");
  assert.equal(withoutCompile(saved), saved);
  assert.equal(restoreLoaderWidgets(widgets, undefined, defaults), false);
  assert.equal(restoreLoaderWidgets(widgets, { model_name: "x" }, defaults), false); // a named form: not ours
});

test("widgets that are not saved (serialize false) are not counted", () => {
  const saved = [...MODEL, false, 2.0, "384*256"];
  const widgets = configuredWidgets(saved);
  const preview = { name: "preview", value: "keep", serialize: false };
  widgets.splice(3, 0, preview);
  restoreLoaderWidgets(widgets, saved, defaults);
  assert.equal(preview.value, "keep");
  assert.deepEqual(valuesOf(widgets.filter((w) => w !== preview)),
                   { ...SET_BEFORE, memory_cap_gib: 2.0, warm_up: "384*256", kernels: "auto", attention: "auto",
                     fp8_compute: "auto", cuda_graphs: "auto" });
});
