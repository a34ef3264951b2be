// The player of the LiveAvatar live view (no ComfyUI imports, so Node can test it: tests/js/).
//
// The node writes a fragmented MP4 in the output folder and sends "liveavatar.live" messages:
// one when the run starts (no bytes yet), one after every block (file name, bytes on disk,
// frames done / total, generation speed, seconds left) and one when the run ends, with its
// status: "finished", "cancelled" or "failed" (and the reason). We fetch only the new bytes
// (HTTP Range) and append them to a Media Source buffer, so the video grows under the player
// without reloading it.

const START_AFTER_SECONDS = 0.4; // buffered video before playback starts: about one block
const LIVE_MAX_LAG_SECONDS = 1.0; // live (a session): playback this far behind what is buffered jumps ahead
const LIVE_JUMP_TO_SECONDS = 0.2; // ... to this far before the end of it
const STATUS_COLOURS = { cancelled: "#e8a33d", failed: "#e05555" };

export class LivePlayer {
  // viewURL(file): the URL that serves {filename, subfolder, type}; env: the browser's globals
  // (document, MediaSource, URL, fetch), replaceable in tests; options.describe(message): the
  // status line (default: a run's progress); options.live: keep playback at the newest block
  // (a conversation: what was said last matters, not every frame).
  constructor(viewURL, env = globalThis, options = {}) {
    this.viewURL = viewURL;
    this.env = env;
    this.describe = options.describe ?? describe;
    this.live = options.live ?? false;
    const doc = env.document;
    this.element = doc.createElement("div");
    this.element.className = "liveavatar-live";
    this.element.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
    this.video = doc.createElement("video");
    this.video.className = "liveavatar-live-video";
    this.video.controls = true;
    this.video.playsInline = true;
    this.video.style.cssText = "width:100%;flex:1;min-height:0;background:#000;object-fit:contain;";
    this.status = doc.createElement("div");
    this.status.className = "liveavatar-live-status";
    this.status.style.cssText = "font:12px monospace;color:var(--input-text,#ddd);text-align:center;";
    this.status.textContent = "Live view: waiting for the first block";
    this.element.append(this.video, this.status);
    this.stream = null; // the run being fed into the player
    this.shown = null; // "subfolder/filename" of what the player shows
  }

  // One message from the node.
  update(message) {
    const file = `${message.subfolder}/${message.filename}`;
    if (this.stream?.file !== file) this.start(file, message);
    this.showStatus(message);
    const stream = this.stream;
    stream.target = Math.max(stream.target, message.bytes);
    stream.done = message.done;
    if (message.done && !message.bytes) {
      this.clear(); // the run ended before its first block: no video to show
      return;
    }
    this.pump(stream);
  }

  // A new run: the previous video leaves the player now, and a new Media Source is fed.
  start(file, message) {
    this.stop();
    const { MediaSource, URL } = this.env;
    const source = new MediaSource();
    const stream = { file, source, url: this.viewURL(message), mime: message.mime, offset: 0, target: 0,
                     done: false, busy: false, stopped: false, buffer: null, objectURL: URL.createObjectURL(source) };
    // The object URL is needed only until the Media Source is attached to the video.
    stream.opened = new Promise((resolve) => source.addEventListener("sourceopen", () => {
      this.release(stream);
      resolve();
    }, { once: true }));
    this.stream = stream;
    this.shown = file;
    this.video.src = stream.objectURL;
  }

  release(stream) {
    if (stream.objectURL) this.env.URL.revokeObjectURL(stream.objectURL);
    stream.objectURL = null;
  }

  stop() {
    if (!this.stream) return;
    this.stream.stopped = true;
    this.release(this.stream);
    this.stream = null;
  }

  clear() {
    this.stop();
    this.video.removeAttribute("src");
    this.video.load();
  }

  showStatus(message) {
    this.status.textContent = this.describe(message);
    this.status.dataset.status = message.status ?? "running";
    this.status.style.color = STATUS_COLOURS[message.status] ?? "var(--input-text,#ddd)";
  }

  // Append the bytes between what we have and what the node reported, one request at a time.
  async pump(stream) {
    if (stream.busy) return;
    stream.busy = true;
    try {
      await stream.opened;
      while (!stream.stopped && stream.offset < stream.target) {
        if (!stream.buffer) stream.buffer = stream.source.addSourceBuffer(stream.mime);
        const range = `bytes=${stream.offset}-${stream.target - 1}`;
        const response = await this.env.fetch(stream.url, { headers: { Range: range }, cache: "no-store" });
        const bytes = await response.arrayBuffer();
        if (!bytes.byteLength || stream.stopped) break;
        await append(stream.buffer, bytes);
        stream.offset += bytes.byteLength;
        this.play(stream);
      }
      if (!stream.stopped && stream.done && stream.offset >= stream.target && stream.source.readyState === "open") {
        stream.source.endOfStream();
      }
    } catch (error) {
      console.warn("LiveAvatar live view:", error);
    } finally {
      stream.busy = false;
    }
    if (!stream.stopped && stream.offset < stream.target) this.pump(stream); // a message came while we fetched
  }

  // Start once about a block is buffered; browsers refuse sound without a user gesture, then
  // we play muted (the controls unmute).
  play(stream) {
    const buffered = this.video.buffered;
    const ahead = buffered.length ? buffered.end(buffered.length - 1) - this.video.currentTime : 0;
    if (this.live && ahead > LIVE_MAX_LAG_SECONDS && !stream.done) {
      this.video.currentTime = buffered.end(buffered.length - 1) - LIVE_JUMP_TO_SECONDS;
    }
    if (!this.video.paused || (ahead < START_AFTER_SECONDS && !stream.done)) return;
    this.video.play().catch(() => {
      this.video.muted = true;
      this.video.play().catch(() => {});
    });
  }

  // After a finished run (or on reloading a graph that ran): the complete file, plainly.
  showFinished(file) {
    const key = `${file.subfolder}/${file.filename}`;
    if (key === this.shown) return;
    this.stop();
    this.shown = key;
    this.video.src = this.viewURL(file);
  }
}

function append(buffer, bytes) {
  return new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", reject, { once: true });
    buffer.appendBuffer(bytes);
  });
}

// The line under the video: progress while running, then how the run ended.
export function describe(m) {
  const seconds = (m.frames / m.video_fps).toFixed(1);
  const of = m.total_frames ? ` of ${m.total_frames}` : "";
  switch (m.status) {
    case "finished":
      return `${m.frames} frames (${seconds} s) generated at ${m.fps} fps`;
    case "cancelled":
      return m.frames ? `Cancelled after ${m.frames}${of} frames; the ${seconds} s made are kept`
        : "Cancelled before the first block; nothing was written";
    case "failed":
      return (m.frames ? `Failed after ${m.frames}${of} frames (the ${seconds} s made are kept)` : "Failed before the first block")
        + `: ${m.reason || "see the ComfyUI log"}`;
    default:
      if (!m.frames) return "Live view: starting (the first block is on its way)";
      if (m.done) return `${m.frames} frames (${seconds} s) generated; the clip is being finished`;
      return `${m.frames} / ${m.total_frames} frames · ${m.fps} fps · ${(m.seconds_left ?? 0).toFixed(0)} s left`;
  }
}
