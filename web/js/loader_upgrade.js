// LiveAvatar Model Loader: a workflow saved before the loader lost its `compile` toggle (and
// gained kernels / attention / fp8_compute) opens with every value in its own widget (the
// logic, testable without ComfyUI, is in loader_widgets.js).
// served at /extensions/<pack folder>/js/: ComfyUI's scripts are three levels up
import { app } from "../../../scripts/app.js";
import { inputDefaults, restoreLoaderWidgets } from "./loader_widgets.js";

const NODE_TYPE = "LiveAvatarModelLoader";

app.registerExtension({
  name: "LiveAvatar.LoaderUpgrade",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const defaults = inputDefaults(nodeData);
    // ComfyUI has set the widgets from the saved list, one by one, when onConfigure runs
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      restoreLoaderWidgets(this.widgets ?? [], info?.widgets_values, defaults);
      return result;
    };
  },
});
