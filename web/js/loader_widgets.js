// Widget values of the LiveAvatar Model Loader saved by an older version of the pack, put
// back in the right widgets (no ComfyUI imports, so Node can test it: tests/js/).
//
// A workflow keeps a node's widget values as a list in the order of its inputs. The loader
// had a `compile` toggle after `kv_cache` (index 7); it is gone, and kernels / attention /
// fp8_compute came after warm_up. An old list has a boolean at index 7, where the loader now
// has memory_cap_gib (a number): without that slot every other value lands in its widget, and
// the widgets the old list had no value for get their defaults.

export const COMPILE_INDEX = 7;

export function isOldLoaderList(values) {
  return Array.isArray(values) && typeof values[COMPILE_INDEX] === "boolean";
}

export function withoutCompile(values) {
  return isOldLoaderList(values) ? values.filter((_, i) => i !== COMPILE_INDEX) : values;
}

// Input name -> default value, from the node definition ComfyUI sends (/object_info): the
// declared default, else a list input's first choice.
export function inputDefaults(nodeData) {
  const defaults = {};
  for (const group of [nodeData?.input?.required, nodeData?.input?.optional]) {
    for (const [name, spec] of Object.entries(group ?? {})) {
      const [type, options] = spec;
      defaults[name] = options?.default ?? (Array.isArray(type) ? type[0] : undefined);
    }
  }
  return defaults;
}

// Sets the node's saved widgets (those with serialize !== false, in order) from an old list:
// its values without compile, then each remaining widget's default. Returns whether the
// list was an old one (a current list is left to ComfyUI, which has already applied it).
export function restoreLoaderWidgets(widgets, values, defaults) {
  if (!isOldLoaderList(values)) return false;
  const kept = withoutCompile(values);
  widgets.filter((w) => w.serialize !== false).forEach((widget, i) => {
    const value = i < kept.length ? kept[i] : defaults[widget.name];
    if (value !== undefined) widget.value = value;
  });
  return true;
}
