// LiveAvatar live view: a video player on the "LiveAvatar Live Video" node that plays the mp4
// while the node is still writing it.
//
// The node writes a fragmented MP4 in the output folder and, after every block, sends a
// "liveavatar.live" message: file name, bytes on disk, frames done / total, generation speed,
// seconds left. We fetch only the new bytes (HTTP Range on ComfyUI's /view) and append them to a
// Media Source buffer, so the video grows under the player without reloading it.
// served at /extensions/<pack folder>/js/: ComfyUI's scripts are three levels up
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "LiveAvatarLiveVideo";
const EVENT = "liveavatar.live";
const START_AFTER_SECONDS = 0.4; // buffered video before playback starts: about one block

class LivePlayer {
  constructor() {
    this.element = document.createElement("div");
    this.element.className = "liveavatar-live";
    this.element.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
    this.video = document.createElement("video");
    this.video.className = "liveavatar-live-video";
    this.video.controls = true;
    this.video.playsInline = true;
    this.video.style.cssText = "width:100%;flex:1;min-height:0;background:#000;object-fit:contain;";
    this.status = document.createElement("div");
    this.status.className = "liveavatar-live-status";
    this.status.style.cssText = "font:12px monospace;color:var(--input-text,#ddd);text-align:center;";
    this.status.textContent = "Live view: waiting for the first block";
    this.element.append(this.video, this.status);
    this.file = null;
  }

  // One message from the node: start a new stream for a new file, then fetch what is new.
  update(message) {
    const file = `${message.subfolder}/${message.filename}`;
    if (file !== this.file) this.start(file, message);
    this.target = message.bytes;
    this.done = message.done;
    this.status.textContent = describe(message);
    this.pump();
  }

  start(file, message) {
    this.file = file;
    this.url = api.apiURL(`/view?${new URLSearchParams({ filename: message.filename, subfolder: message.subfolder, type: message.type })}`);
    this.offset = 0;
    this.target = 0;
    this.busy = false;
    this.mediaSource = new MediaSource();
    this.opened = new Promise((resolve) => this.mediaSource.addEventListener("sourceopen", resolve, { once: true }));
    this.video.src = URL.createObjectURL(this.mediaSource);
    this.mime = message.mime;
    this.buffer = null;
  }

  // Append the bytes between what we have and what the node reported, one request at a time.
  async pump() {
    if (this.busy) return;
    this.busy = true;
    try {
      await this.opened;
      if (!this.buffer) this.buffer = this.mediaSource.addSourceBuffer(this.mime);
      while (this.offset < this.target) {
        const end = this.target - 1;
        const response = await fetch(this.url, { headers: { Range: `bytes=${this.offset}-${end}` }, cache: "no-store" });
        const bytes = await response.arrayBuffer();
        if (!bytes.byteLength) break;
        await this.append(bytes);
        this.offset += bytes.byteLength;
        this.play();
      }
      if (this.done && this.offset >= this.target && this.mediaSource.readyState === "open") {
        this.mediaSource.endOfStream();
      }
    } catch (error) {
      console.warn("LiveAvatar live view:", error);
    } finally {
      this.busy = false;
    }
    if (this.offset < this.target) this.pump(); // a message came while we were fetching
  }

  append(bytes) {
    return new Promise((resolve, reject) => {
      this.buffer.addEventListener("updateend", resolve, { once: true });
      this.buffer.addEventListener("error", reject, { once: true });
      this.buffer.appendBuffer(bytes);
    });
  }

  // Start once about a block is buffered; browsers refuse sound without a user gesture, then
  // we play muted (the controls unmute).
  play() {
    const buffered = this.video.buffered;
    const ahead = buffered.length ? buffered.end(buffered.length - 1) - this.video.currentTime : 0;
    if (!this.video.paused || (ahead < START_AFTER_SECONDS && !this.done)) return;
    this.video.play().catch(() => {
      this.video.muted = true;
      this.video.play().catch(() => {});
    });
  }

  // After the run (or on reloading a finished graph): the complete file, plainly.
  showFinished(file) {
    const key = `${file.subfolder}/${file.filename}`;
    if (key === this.file) return;
    this.file = key;
    this.video.src = api.apiURL(`/view?${new URLSearchParams(file)}`);
  }
}

function describe(m) {
  if (m.done) return `${m.frames} frames (${(m.frames / m.video_fps).toFixed(1)} s) generated at ${m.fps} fps`;
  return `${m.frames} / ${m.total_frames} frames · ${m.fps} fps · ${m.seconds_left.toFixed(0)} s left`;
}

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
      const player = new LivePlayer();
      // Not saved in the workflow (widget.serialize) nor sent with the prompt (options.serialize):
      // widgets_values stay as the node's inputs declare them.
      const widget = this.addDOMWidget("live_view", "liveavatar_live_view", player.element, { serialize: false, getMinHeight: () => 260 });
      widget.serialize = false;
      this.liveAvatarPlayer = player; // found by node id when a message comes (ids are set after creation)
      return result;
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
