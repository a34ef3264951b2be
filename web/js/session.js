// LiveAvatar live session: Start / Stop on the "LiveAvatar Live Session" node, the microphone (or an
// audio file played in real time) sent to the session as it runs, and its video played on the
// node while it is made (the player of the live view). The audio path itself, testable without
// ComfyUI, is in session_capture.js.
//
// Start queues the workflow (unless this node's session already runs), then sends the audio once
// the node says the session is ready: that message, with the session's token, comes only to the
// page that queued it. Stop asks the session to end (it finishes the speech it has and saves the
// mp4); closing the page does the same (sendBeacon), and a page that stops sending is let go by the
// node after its disconnect_s.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { LivePlayer } from "./live_player.js";
import { Chunker, ChunkSender, RealTimePlayer, Resampler, decodeFile, describeSession, openMicrophone } from "./session_capture.js";

const NODE_TYPE = "LiveAvatarSession";
const EVENT = "liveavatar.session";
const FILE_TICK_MS = 50;

const viewURL = (file) => api.apiURL(`/view?${new URLSearchParams({ filename: file.filename, subfolder: file.subfolder, type: file.type })}`);

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text) e.textContent = text;
  return e;
}

class SessionControls {
  constructor() {
    this.player = new LivePlayer(viewURL, globalThis, { describe: describeSession, live: true });
    this.player.status.textContent = "Press Start and speak (the workflow is queued)";
    this.element = element("div", "liveavatar-session");
    this.element.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
    const row = element("div", "liveavatar-session-controls");
    row.style.cssText = "display:flex;gap:6px;align-items:center;font:12px sans-serif;";
    this.sourceSelect = element("select", "liveavatar-session-source");
    for (const [value, label] of [["microphone", "Microphone"], ["file", "Audio file"]]) {
      const option = element("option", null, label);
      option.value = value;
      this.sourceSelect.append(option);
    }
    this.fileInput = element("input", "liveavatar-session-file");
    this.fileInput.type = "file";
    this.fileInput.accept = "audio/*";
    this.fileInput.style.display = "none";
    this.sourceSelect.addEventListener("change", () => {
      this.fileInput.style.display = this.sourceSelect.value === "file" ? "" : "none";
    });
    this.startButton = element("button", "liveavatar-session-start", "Start");
    this.stopButton = element("button", "liveavatar-session-stop", "Stop");
    this.startButton.addEventListener("click", () => this.start());
    this.stopButton.addEventListener("click", () => this.stop());
    row.append(this.sourceSelect, this.fileInput, this.startButton, this.stopButton);
    this.capture = element("div", "liveavatar-session-capture");
    this.capture.style.cssText = "font:11px monospace;color:var(--descrip-text,#999);text-align:center;";
    this.element.append(this.player.element, row, this.capture);
    this.reset();
  }

  reset() {
    this.closeSource();
    Object.assign(this, { phase: "idle", ready: null, sender: null, wantAudio: false, stopWhenReady: false });
    this.buttons();
  }

  buttons() {
    this.startButton.disabled = this.phase === "queued" || this.phase === "live";
    this.stopButton.disabled = this.phase === "idle";
  }

  say(text) { this.capture.textContent = text; }

  async start() {
    if (this.phase === "live") return;
    this.wantAudio = true;
    this.stopWhenReady = false;
    try {
      await this.openSource();
    } catch (error) {
      this.say(`No audio: ${error.message ?? error}`);
      this.wantAudio = false;
      return;
    }
    if (this.ready) { this.beginSending(); return; }
    if (this.phase === "idle") {
      this.phase = "queued";
      this.buttons();
      this.say("Queued: the session starts once the models are loaded");
      try {
        await app.queuePrompt(0, 1);
      } catch (error) {
        this.say(`Could not queue the workflow: ${error.message ?? error}`);
        this.reset();
      }
    }
  }

  // The microphone is opened on the click (its permission asks for a user gesture); its samples
  // go nowhere until the session is ready. A file is decoded now and played once ready.
  async openSource() {
    this.closeSource();
    if (this.sourceSelect.value === "file") {
      const file = this.fileInput.files?.[0];
      if (!file) throw new Error("pick an audio file first");
      this.source = { kind: "file", samples: await decodeFile(file), name: file.name };
      this.player.video.muted = false;
    } else {
      const source = { kind: "microphone", resampler: null, feed: null };
      source.mic = await openMicrophone((samples) => source.feed?.(source.resampler.push(samples)));
      source.resampler = new Resampler(source.mic.rate);
      this.source = source;
      this.player.video.muted = true; // your own voice a second late makes speaking hard (unmute on the player)
    }
  }

  closeSource() {
    if (!this.source) return;
    clearInterval(this.source.timer);
    this.source.mic?.close();
    this.source = null;
  }

  onReady(ready) {
    this.ready = ready;
    if (this.stopWhenReady) { this.stop(); return; }
    if (this.wantAudio && this.source) this.beginSending();
    else { this.phase = "ready"; this.say("Session ready: press Start to talk"); this.buttons(); }
  }

  beginSending() {
    const ready = this.ready;
    this.sender = new ChunkSender({
      url: ready.audio_url, token: ready.token, fetch: (url, options) => api.fetchApi(url, options),
      onEnd: (reason) => { this.closeSource(); this.say(`Audio stopped: ${reason}`); },
      onInfo: (info) => this.say(info),
    });
    const chunker = new Chunker((chunk) => this.sender.push(chunk));
    const source = this.source;
    if (source.kind === "file") {
      const player = new RealTimePlayer(source.samples, () => performance.now() / 1000);
      source.timer = setInterval(() => {
        chunker.push(player.due());
        this.say(`${source.name}: ${player.finished ? "played; silence now" : "playing"} · ${this.sentText()}`);
      }, FILE_TICK_MS);
    } else {
      source.feed = (samples) => { chunker.push(samples); this.say(`Microphone on · ${this.sentText()}`); };
    }
    this.phase = "live";
    this.buttons();
  }

  sentText() {
    const sender = this.sender;
    return `${(sender.sent / 16000).toFixed(1)} s sent` + (sender.lost ? `, ${(sender.lost / 16000).toFixed(1)} s lost` : "");
  }

  async stop() {
    if (!this.ready) {
      if (this.phase === "queued") { this.stopWhenReady = true; this.say("Stopping once the session starts"); }
      this.closeSource();
      return;
    }
    this.closeSource();
    this.say("Stopping: the last speech is finished and saved");
    try {
      await api.fetchApi(this.ready.stop_url, { method: "POST", headers: { "X-LiveAvatar-Token": this.ready.token } });
    } catch (error) {
      this.say(`Stop did not reach the session (${error}); it ends when no audio comes`);
    }
  }

  // Closing the page: the session is asked to end now rather than after its disconnect_s.
  leave() {
    if (!this.ready) return;
    navigator.sendBeacon(api.apiURL(this.ready.stop_url),
                         new Blob([JSON.stringify({ token: this.ready.token })], { type: "application/json" }));
  }

  update(message) {
    if (message.ready) { this.onReady(message.ready); return; }
    this.player.update(message);
    if (message.status && message.status !== "running") {
      const last = this.capture.textContent;
      this.reset();
      if (last) this.say(last);
    }
  }
}

function sessionFor(nodeId) {
  const node = app.graph?.getNodeById(Number(nodeId)) ?? app.graph?.getNodeById(nodeId);
  if (node?.liveAvatarSession) return node.liveAvatarSession;
  // Unknown id (e.g. a node inside a subgraph): the only session node of the graph, if any.
  const sessions = (app.graph?.nodes ?? []).filter((n) => n.liveAvatarSession);
  return sessions.length === 1 ? sessions[0].liveAvatarSession : null;
}

app.registerExtension({
  name: "LiveAvatar.Session",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const controls = new SessionControls();
      // Not saved in the workflow nor sent with the prompt (as the live view's player).
      const widget = this.addDOMWidget("session", "liveavatar_session", controls.element,
                                       { serialize: false, getMinHeight: () => 320 });
      widget.serialize = false;
      this.liveAvatarSession = controls;
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.liveAvatarSession?.stop();
      this.liveAvatarSession?.player.clear();
      return onRemoved?.apply(this, arguments);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const file = output?.live_video?.[0];
      if (file) this.liveAvatarSession?.player.showFinished(file);
    };
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => sessionFor(detail.node)?.update(detail));
    window.addEventListener("pagehide", () => {
      for (const node of app.graph?.nodes ?? []) node.liveAvatarSession?.leave();
    });
  },
});
