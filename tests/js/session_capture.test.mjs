// Unit test of a live session's page side (web/js/session_capture.js): resampling to 16 kHz,
// 0.1 s chunks that know their place, the sender's handling of the route's answers, a file
// played in real time, the status line. Run: node --test tests/js/session_capture.test.mjs
// (tests/test_session_js.py does, under pytest).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";

const source = await readFile(new URL("../../web/js/session_capture.js", import.meta.url), "utf8");
const { Resampler, Chunker, ChunkSender, RealTimePlayer, describeSession, RATE } =
  await import(`data:text/javascript,${encodeURIComponent(source)}`);

const sine = (freq, rate, seconds, amplitude = 0.5) =>
  Float32Array.from({ length: Math.round(rate * seconds) }, (_, i) => amplitude * Math.sin(2 * Math.PI * freq * i / rate));

function feedInPieces(resampler, samples, sizes) {
  const out = [];
  let at = 0, k = 0;
  while (at < samples.length) {
    const n = sizes[k++ % sizes.length];
    out.push(...resampler.push(samples.subarray(at, at + n)));
    at += n;
  }
  return Float32Array.from(out);
}

const rms = (x) => Math.sqrt(x.reduce((s, v) => s + v * v, 0) / x.length);

test("48 kHz -> 16 kHz keeps a 440 Hz tone, sample for sample, for any feed sizes", () => {
  const input = sine(440, 48000, 1.0);
  const whole = new Resampler(48000).push(input);
  const pieces = feedInPieces(new Resampler(48000), input, [128, 1, 333, 2048]);
  assert.equal(pieces.length, whole.length);
  assert.ok(pieces.every((v, i) => Math.abs(v - whole[i]) < 1e-6));
  const expected = sine(440, RATE, 1.0);
  // output sample n is input time 3n: the same instants; away from the start (the filter's
  // left side sees silence there) they match the tone made at 16 kHz
  for (let n = 200; n < whole.length; n++) assert.ok(Math.abs(whole[n] - expected[n]) < 2e-3, `sample ${n}`);
  assert.ok(whole.length > 15900 && whole.length <= 16000); // the last 16 ms wait for the samples after them
});

test("a tone above 8 kHz does not fold back into the 16 kHz stream", () => {
  const out = new Resampler(48000).push(sine(12000, 48000, 0.5));
  assert.ok(rms(out.subarray(200)) < 0.005, `aliased level ${rms(out.subarray(200))}`);
});

test("44.1 kHz -> 16 kHz keeps a 1 kHz tone's level", () => {
  const out = new Resampler(44100).push(sine(1000, 44100, 0.5));
  const level = rms(out.subarray(400));
  assert.ok(Math.abs(level - 0.5 / Math.SQRT2) < 0.005, `level ${level}`);
});

test("chunks of 0.1 s of 16-bit samples, each with its first sample's offset", () => {
  const chunks = [];
  const chunker = new Chunker((chunk) => chunks.push(chunk));
  chunker.push(new Float32Array(1000).fill(0.5));
  chunker.push(new Float32Array(2500).fill(-1.5));
  assert.deepEqual(chunks.map((c) => [c.offset, c.bytes.byteLength]), [[0, 3200], [1600, 3200]]);
  const first = new Int16Array(chunks[0].bytes), second = new Int16Array(chunks[1].bytes);
  assert.equal(first[0], 16384);
  assert.equal(first[999], 16384);
  assert.equal(first[1000], -32768); // clipped
  assert.equal(second[0], -32768);
});

function route(answers) {
  const calls = [];
  const fetch = async (url, options) => {
    calls.push({ url, offset: Number(options.headers["X-LiveAvatar-Offset"]), token: options.headers["X-LiveAvatar-Token"] });
    const [status, body] = answers.shift() ?? [200, {}];
    return { ok: status === 200, status, json: async () => body };
  };
  return { calls, fetch };
}

const chunk = (offset) => ({ offset, bytes: new ArrayBuffer(3200) });
const settle = () => new Promise((resolve) => setTimeout(resolve, 20));

test("the sender sends in order, retries what was too fast, leaves out what the session could not take", async () => {
  const { calls, fetch } = route([[200, {}], [429, { error: "too fast" }], [200, {}], [503, { error: "behind" }], [200, {}]]);
  const infos = [];
  const sender = new ChunkSender({ url: "/a", token: "t", fetch, onInfo: (i) => infos.push(i), wait: async () => {} });
  for (const offset of [0, 1600, 3200, 4800]) sender.push(chunk(offset));
  await settle();
  assert.deepEqual(calls.map((c) => c.offset), [0, 1600, 1600, 3200, 4800]);
  assert.ok(calls.every((c) => c.url === "/a" && c.token === "t"));
  assert.equal(sender.sent, 3 * 1600);
  assert.equal(sender.lost, 1600);
  assert.deepEqual(infos, ["behind"]);
});

test("the sender stops for good when the session is over for this page", async () => {
  const { calls, fetch } = route([[200, {}], [410, { error: "the session has ended (stopped from the page)" }]]);
  const ends = [];
  const sender = new ChunkSender({ url: "/a", token: "t", fetch, onEnd: (r) => ends.push(r) });
  for (const offset of [0, 1600, 3200]) sender.push(chunk(offset));
  await settle();
  sender.push(chunk(4800));
  await settle();
  assert.deepEqual(calls.map((c) => c.offset), [0, 1600]);
  assert.deepEqual(ends, ["the session has ended (stopped from the page)"]);
});

test("a stalled connection loses its oldest chunks beyond 3 s of queue", async () => {
  let release;
  const stalled = new Promise((resolve) => { release = resolve; });
  const offsets = [];
  const fetch = async (url, options) => {
    offsets.push(Number(options.headers["X-LiveAvatar-Offset"]));
    await stalled;
    return { ok: true, status: 200, json: async () => ({}) };
  };
  const sender = new ChunkSender({ url: "/a", token: "t", fetch });
  for (let i = 0; i < 40; i++) sender.push(chunk(i * 1600));
  release();
  await settle();
  assert.equal(sender.lost, 9 * 1600); // 40 pushed: the first in flight, 30 kept, 9 dropped
  assert.equal(offsets[0], 0);
  assert.equal(offsets[1], 10 * 1600);
  assert.equal(offsets.length, 31);
});

test("a file is handed out as real time passes, then silence", () => {
  let now = 10;
  const player = new RealTimePlayer(Float32Array.from({ length: 4000 }, (_, i) => i + 1), () => now);
  assert.equal(player.due().length, 0);
  now += 0.1;
  assert.deepEqual(Array.from(player.due().subarray(0, 3)), [1, 2, 3]);
  assert.equal(player.given, 1600);
  now += 0.2;
  const rest = player.due();
  assert.equal(rest.length, 3200);
  assert.equal(rest[2399], 4000);
  assert.equal(rest[2400], 0);
  assert.ok(player.finished);
});

test("the session's status line", () => {
  const m = (fields, session) => ({ frames: 0, video_fps: 25, status: "running", reason: "", ...fields, session });
  assert.equal(describeSession(m({}, { state: "starting" })),
               "Starting the session: loading the models, encoding the portrait");
  assert.equal(describeSession(m({ frames: 50 }, { state: "live", latency_s: 0.91, latency_p50_s: 0.87, keeping_up: true,
                                                  silence_s: 0 })),
               "Live · 50 frames (2.0 s) · latency 0.9 s (median 0.9) · keeping up");
  assert.equal(describeSession(m({ frames: 50 }, { state: "live", latency_s: null, keeping_up: false, waiting_s: 2.5,
                                                  silence_s: 1.25 })),
               "Live · 50 frames (2.0 s) · falling behind: 2.5 s of speech waiting · 1.3 s silence");
  assert.equal(describeSession(m({ frames: 100, status: "finished" }, { ended: "stopped from the page" })),
               "Session ended (stopped from the page): 100 frames (4.0 s) saved");
  assert.equal(describeSession(m({ frames: 21, status: "failed", reason: "RuntimeError: x" }, {})),
               "Session failed after 21 frames (the 0.8 s made are saved): RuntimeError: x");
});
