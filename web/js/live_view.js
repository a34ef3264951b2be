// LiveAvatar live view: a video player on the "LiveAvatar Live Video" node that plays the mp4
// while the node is still writing it, and says how the run ended (the player itself, testable
// without ComfyUI, is in live_player.js).
// served at /extensions/<pack folder>/js/: ComfyUI's scripts are three levels up
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { LivePlayer } from "./live_player.js";

const NODE_TYPE = "LiveAvatarLiveVideo";
const EVENT = "liveavatar.live";

const viewURL = (file) => api.apiURL(`/view?${new URLSearchParams({ filename: file.filename, subfolder: file.subfolder, type: file.type })}`);

function playerFor(nodeId) {
  const node = app.graph?.getNodeById(Number(nodeId)) ?? app.graph?.getNodeById(nodeId);
  if (node?.liveAvatarPlayer) return node.liveAvatarPlayer;
  // Unknown id (e.g. a node inside a subgraph): the only live node of the graph, if any.
  const live = (app.graph?.nodes ?? []).filter((n) => n.liveAvatarPlayer);
  return live.length === 1 ? live[0].liveAvatarPlayer : null;
}

app.registerExtension({
  name: "LiveAvatar.LiveView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const player = new LivePlayer(viewURL);
      // Not saved in the workflow (widget.serialize) nor sent with the prompt (options.serialize):
      // widgets_values stay as the node's inputs declare them.
      const widget = this.addDOMWidget("live_view", "liveavatar_live_view", player.element, { serialize: false, getMinHeight: () => 260 });
      widget.serialize = false;
      this.liveAvatarPlayer = player; // found by node id when a message comes (ids are set after creation)
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.liveAvatarPlayer?.clear(); // no Media Source or object URL outlives the node
      return onRemoved?.apply(this, arguments);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const file = output?.live_video?.[0];
      if (file) this.liveAvatarPlayer?.showFinished(file);
    };
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => playerFor(detail.node)?.update(detail));
  },
});
