// Unit test of the live view's player (web/js/live_player.js) with a stand-in browser:
// Media Source, object URLs, fetch and the DOM are recorded fakes.
// Run: node --test tests/js/live_player.test.mjs (tests/test_live_player_js.py does, under pytest)
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";

// Imported from its source text, so Node needs no package.json to read it as a module.
const source = await readFile(new URL("../../web/js/live_player.js", import.meta.url), "utf8");
const { LivePlayer, describe } = await import(`data:text/javascript,${encodeURIComponent(source)}`);

class FakeEvents {
  constructor() { this.listeners = {}; }
  addEventListener(name, fn) { (this.listeners[name] ??= []).push(fn); }
  fire(name) { const fns = this.listeners[name] ?? []; this.listeners[name] = []; fns.forEach((fn) => fn()); }
}

function browser(fileBytes) {
  const env = { created: [], revoked: [], fetched: [], sources: [] };
  const element = (tag) => ({
    tag, style: {}, dataset: {}, children: [], attributes: {}, loads: 0,
    append(...nodes) { this.children.push(...nodes); },
    removeAttribute(name) { if (name === "src") this.src = undefined; },
    load() { this.loads += 1; },
    play() { this.paused = false; return Promise.resolve(); },
    paused: true, currentTime: 0, buffered: { length: 0 },
  });
  env.document = { createElement: element };
  env.MediaSource = class extends FakeEvents {
    constructor() { super(); this.readyState = "closed"; this.ended = false; this.appended = []; env.sources.push(this); }
    open() { this.readyState = "open"; this.fire("sourceopen"); }
    addSourceBuffer(mime) {
      this.mime = mime;
      const source = this;
      const buffer = new FakeEvents();
      buffer.appendBuffer = (bytes) => { source.appended.push(bytes.byteLength); setTimeout(() => buffer.fire("updateend")); };
      return buffer;
    }
    endOfStream() { this.readyState = "ended"; this.ended = true; }
  };
  let next = 0;
  env.URL = {
    createObjectURL: () => { const url = `blob:${next++}`; env.created.push(url); return url; },
    revokeObjectURL: (url) => env.revoked.push(url),
  };
  env.fetch = async (url, options) => {
    const [, start, end] = /bytes=(\d+)-(\d+)/.exec(options.headers.Range).map(Number);
    env.fetched.push([url, start, end]);
    return { arrayBuffer: async () => new ArrayBuffer(Math.min(end, fileBytes - 1) - start + 1) };
  };
  return env;
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 20));
const viewURL = (file) => `/view?filename=${file.filename}`;
const message = (fields) => ({ node: "3", filename: "live_00001.mp4", subfolder: "", type: "output",
  mime: 'video/mp4; codecs="avc1.640028, mp4a.40.2"', status: "running", reason: "", bytes: 0, frames: 0,
  total_frames: 29, fps: 2.5, video_fps: 25, done: false, seconds_left: null, ...fields });

test("a run is fed block by block, then ended; its object URL is revoked once attached", async () => {
  const env = browser(3000);
  const player = new LivePlayer(viewURL, env);
  player.update(message({}));
  assert.equal(player.video.src, "blob:0");
  env.sources[0].open();
  player.update(message({ bytes: 1000, frames: 9, seconds_left: 8 }));
  await settle();
  player.update(message({ bytes: 3000, frames: 29, status: "finished", done: true, seconds_left: 0 }));
  await settle();
  assert.deepEqual(env.fetched.map(([, s, e]) => [s, e]), [[0, 999], [1000, 2999]]);
  assert.deepEqual(env.sources[0].appended, [1000, 2000]);
  assert.equal(env.sources[0].ended, true);
  assert.deepEqual(env.revoked, ["blob:0"]);
  assert.equal(player.status.textContent, "29 frames (1.2 s) generated at 2.5 fps");
});

test("a new run clears the old video at its start and revokes every object URL", async () => {
  const env = browser(1000);
  const player = new LivePlayer(viewURL, env);
  for (let run = 1; run <= 3; run++) {
    const filename = `live_0000${run}.mp4`;
    player.update(message({ filename }));
    // the first message of a run (no bytes yet) already replaces the previous video
    assert.equal(player.video.src, `blob:${run - 1}`);
    if (run < 3) {
      env.sources[run - 1].open();
      player.update(message({ filename, bytes: 1000, frames: 9, status: "finished", done: true }));
      await settle();
    }
  }
  player.clear(); // the node is removed while the third run's source was never attached
  assert.deepEqual(env.created, ["blob:0", "blob:1", "blob:2"]);
  assert.deepEqual([...env.revoked].sort(), env.created);
  assert.equal(player.video.src, undefined);
});

test("a cancelled run says so and keeps its frames playable", async () => {
  const env = browser(1000);
  const player = new LivePlayer(viewURL, env);
  player.update(message({}));
  env.sources[0].open();
  player.update(message({ bytes: 1000, frames: 9 }));
  player.update(message({ bytes: 1000, frames: 9, status: "cancelled", done: true, seconds_left: 0 }));
  await settle();
  assert.equal(player.status.textContent, "Cancelled after 9 of 29 frames; the 0.4 s made are kept");
  assert.equal(player.status.dataset.status, "cancelled");
  assert.deepEqual(env.sources[0].appended, [1000]);
  assert.equal(env.sources[0].ended, true);
  assert.equal(player.video.src, "blob:0");
});

test("a run that fails before its first block clears the player and gives the reason", async () => {
  const env = browser(0);
  const player = new LivePlayer(viewURL, env);
  player.update(message({}));
  player.update(message({ status: "failed", done: true, reason: "RuntimeError: out of memory" }));
  assert.equal(player.status.textContent, "Failed before the first block: RuntimeError: out of memory");
  assert.equal(player.video.src, undefined);
  assert.deepEqual(env.revoked, env.created);
  assert.deepEqual(env.fetched, []);
});

test("the status line while running", () => {
  assert.equal(describe(message({})), "Live view: starting (the first block is on its way)");
  assert.equal(describe(message({ frames: 21, seconds_left: 3.4 })), "21 / 29 frames · 2.5 fps · 3 s left");
  assert.equal(describe(message({ frames: 29, done: true })), "29 frames (1.2 s) generated; the clip is being finished");
  assert.equal(describe(message({ frames: 0, status: "cancelled", done: true })),
    "Cancelled before the first block; nothing was written");
  assert.equal(describe(message({ frames: 9, status: "failed", done: true, reason: "OSError: disk full" })),
    "Failed after 9 of 29 frames (the 0.4 s made are kept): OSError: disk full");
});

test("reloading a graph shows the finished file plainly", () => {
  const env = browser(0);
  const player = new LivePlayer(viewURL, env);
  player.showFinished({ filename: "live_00004.mp4", subfolder: "", type: "output" });
  assert.equal(player.video.src, "/view?filename=live_00004.mp4");
  assert.deepEqual(env.created, []);
});
