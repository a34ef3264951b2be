// The audio side of a LiveAvatar live session in the page (no ComfyUI imports, so Node can test
// it: tests/js/session_capture.test.mjs): a source (the microphone, or an audio file played in
// real time) -> 16 kHz mono (Resampler) -> 16-bit chunks of 0.1 s that know their place in the
// capture (Chunker) -> POSTed one after another to the session's route (ChunkSender).

export const RATE = 16000; // what the session takes: 16 kHz mono, 16-bit little-endian
export const CHUNK_SECONDS = 0.1;
const SINC_ZEROS = 16; // the resampler's low-pass: a Blackman-windowed sinc, 16 zero crossings a side
const MAX_QUEUE_SECONDS = 3; // chunks waiting to be sent beyond this: the oldest go (the session filled them)

// Streaming sample-rate conversion to 16 kHz: each output sample is a windowed-sinc blend of the
// input around its time, with the cut-off at the lower Nyquist frequency (no aliasing when going
// down). Feeds of any size give the same output as one feed of everything.
export class Resampler {
  constructor(inRate, outRate = RATE) {
    this.step = inRate / outRate; // input samples per output sample
    this.cutoff = Math.min(1, outRate / inRate); // of the input's Nyquist frequency
    this.half = Math.ceil(SINC_ZEROS / this.cutoff); // input samples each side of an output sample
    this.history = new Float32Array(0); // input kept for the next outputs' left side
    this.first = 0; // index (in the whole input) of history[0]
    this.next = 0; // position (in input samples) of the next output sample
  }

  push(samples) {
    const input = new Float32Array(this.history.length + samples.length);
    input.set(this.history);
    input.set(samples, this.history.length);
    const out = [];
    while (this.next + this.half < this.first + input.length) {
      out.push(this.sample(input, this.next - this.first));
      this.next += this.step;
    }
    const keep = Math.max(0, Math.floor(this.next) - this.half - this.first);
    this.history = input.slice(keep);
    this.first += keep;
    return Float32Array.from(out);
  }

  sample(input, at) {
    let sum = 0, weights = 0;
    const lo = Math.ceil(at - this.half), hi = Math.floor(at + this.half);
    for (let i = lo; i <= hi; i++) {
      const t = (i - at) * this.cutoff; // in output samples
      const x = (Math.PI * (i - at)) / this.half; // -pi .. pi over the window
      const w = (t === 0 ? 1 : Math.sin(Math.PI * t) / (Math.PI * t)) * (0.42 + 0.5 * Math.cos(x) + 0.08 * Math.cos(2 * x));
      weights += w;
      if (i >= 0) sum += w * input[i]; // (before the stream's start: silence)
    }
    return sum / weights; // gain 1 at 0 Hz
  }
}

// 16 kHz float samples -> {offset, bytes} chunks of CHUNK_SECONDS, offset = first sample's index
// in the capture.
export class Chunker {
  constructor(onChunk, size = Math.round(RATE * CHUNK_SECONDS)) {
    this.onChunk = onChunk;
    this.buffer = new Int16Array(size);
    this.filled = 0;
    this.offset = 0;
  }

  push(samples) {
    for (const value of samples) {
      this.buffer[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(value * 32768)));
      if (this.filled === this.buffer.length) {
        this.onChunk({ offset: this.offset, bytes: this.buffer.slice().buffer });
        this.offset += this.filled;
        this.filled = 0;
      }
    }
  }
}

// Chunks to the session's audio route, one request at a time and in order. The route's answers:
// 429 (too fast) -> the chunk is sent again a little later; 503 (generation behind) -> the chunk
// is left out (the session puts silence in its place) and said; 403/404/410/400/413 -> the
// session is over for this page (onEnd with the route's reason). A queue longer than
// MAX_QUEUE_SECONDS (a stalled connection) loses its oldest chunks: they would come too late.
export class ChunkSender {
  constructor({ url, token, fetch, onEnd = () => {}, onInfo = () => {}, wait = (ms) => new Promise((r) => setTimeout(r, ms)) }) {
    Object.assign(this, { url, token, fetch, onEnd, onInfo, wait });
    this.queue = [];
    this.busy = false;
    this.ended = false;
    this.sent = 0; // samples the route took
    this.lost = 0; // samples left out (stalled queue, generation behind)
  }

  push(chunk) {
    if (this.ended) return;
    this.queue.push(chunk);
    const max = Math.ceil(MAX_QUEUE_SECONDS / CHUNK_SECONDS);
    while (this.queue.length > max) this.lost += this.queue.shift().bytes.byteLength / 2;
    this.pump();
  }

  async pump() {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length && !this.ended) {
        const chunk = this.queue.shift();
        const answer = await this.send(chunk);
        if (answer.status === 429) { this.queue.unshift(chunk); await this.wait(50); continue; }
        if (answer.ok) this.sent += chunk.bytes.byteLength / 2;
        else if (answer.status === 503) { this.lost += chunk.bytes.byteLength / 2; this.onInfo(answer.error); }
        else this.end(answer.error || `the session refused the audio (HTTP ${answer.status})`);
      }
    } finally {
      this.busy = false;
    }
  }

  async send(chunk) {
    try {
      const response = await this.fetch(this.url, {
        method: "POST", body: chunk.bytes,
        headers: { "Content-Type": "application/octet-stream", "X-LiveAvatar-Token": this.token,
                   "X-LiveAvatar-Offset": String(chunk.offset) },
      });
      const body = await response.json().catch(() => ({}));
      return { ok: response.ok, status: response.status, error: body.error };
    } catch (error) { // the network: this chunk is lost, the next may get through
      return { ok: false, status: 503, error: `audio not sent: ${error}` };
    }
  }

  end(reason) {
    if (this.ended) return;
    this.ended = true;
    this.queue = [];
    this.onEnd(reason);
  }
}

// An audio file's samples (16 kHz mono) handed out as real time passes, then silence: the
// session hears it as it would a microphone, and goes on idling after it.
export class RealTimePlayer {
  constructor(samples, now) {
    this.samples = samples;
    this.now = now; // () => seconds
    this.started = now();
    this.given = 0;
  }

  // The samples due since the last call (silence past the file's end).
  due() {
    const until = Math.floor((this.now() - this.started) * RATE + 1e-6);
    if (until <= this.given) return new Float32Array(0);
    const out = new Float32Array(until - this.given);
    const from = this.samples.subarray(Math.min(this.given, this.samples.length), Math.min(until, this.samples.length));
    out.set(from);
    this.given = until;
    return out;
  }

  get finished() {
    return this.given >= this.samples.length;
  }
}

// The microphone's samples, mono at the audio context's rate, through an AudioWorklet (from a
// Blob: ComfyUI imports every .js of the extension as a module of the page, which a worklet
// file is not) or, where there is none, a ScriptProcessor.
const WORKLET = `class LiveAvatarCapture extends AudioWorkletProcessor {
  process(inputs) { const c = inputs[0]; if (c && c.length) this.port.postMessage(c[0].slice(0)); return true; }
}
registerProcessor("liveavatar-capture", LiveAvatarCapture);`;

export async function openMicrophone(onSamples, env = globalThis) {
  const stream = await env.navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
  const context = new env.AudioContext();
  await context.resume();
  const source = context.createMediaStreamSource(stream);
  let node;
  if (context.audioWorklet) {
    const url = env.URL.createObjectURL(new env.Blob([WORKLET], { type: "application/javascript" }));
    await context.audioWorklet.addModule(url);
    env.URL.revokeObjectURL(url);
    node = new env.AudioWorkletNode(context, "liveavatar-capture", { numberOfInputs: 1, numberOfOutputs: 0 });
    node.port.onmessage = ({ data }) => onSamples(data);
    source.connect(node);
  } else {
    node = context.createScriptProcessor(2048, 1, 1);
    node.onaudioprocess = ({ inputBuffer }) => onSamples(inputBuffer.getChannelData(0).slice(0));
    source.connect(node);
    node.connect(context.destination); // (a ScriptProcessor runs only when connected)
  }
  return {
    rate: context.sampleRate,
    close() {
      source.disconnect();
      node.disconnect();
      stream.getTracks().forEach((track) => track.stop());
      context.close();
    },
  };
}

// An audio file as 16 kHz mono samples (the browser decodes and resamples it).
export async function decodeFile(file, env = globalThis) {
  const bytes = await file.arrayBuffer();
  const context = new env.AudioContext();
  const decoded = await context.decodeAudioData(bytes);
  context.close();
  const offline = new env.OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * RATE)), RATE);
  const player = offline.createBufferSource();
  player.buffer = decoded;
  player.connect(offline.destination);
  player.start();
  return (await offline.startRendering()).getChannelData(0);
}

// The line under a session's video: how it stands, then how it ended.
export function describeSession(m) {
  const s = m.session ?? {};
  const seconds = (m.frames / (m.video_fps || 25)).toFixed(1);
  switch (m.status) {
    case "finished":
      return `Session ended (${s.ended ?? "stopped"}): ${m.frames} frames (${seconds} s) saved`;
    case "cancelled":
      return m.frames ? `Session cancelled after ${m.frames} frames; the ${seconds} s made are saved`
        : "Session cancelled before the first block";
    case "failed":
      return `Session failed after ${m.frames} frames${m.frames ? ` (the ${seconds} s made are saved)` : ""}: `
        + (m.reason || "see the ComfyUI log");
    default:
      break;
  }
  if (s.state === "starting") return "Starting the session: loading the models, encoding the portrait";
  if (s.state === "waiting") return "Session ready: speak (press Start if this page is not sending)";
  const latency = s.latency_s != null ? ` · latency ${s.latency_s.toFixed(1)} s (median ${s.latency_p50_s.toFixed(1)})` : "";
  const pace = s.keeping_up === false ? ` · falling behind: ${(s.waiting_s ?? 0).toFixed(1)} s of speech waiting`
    : " · keeping up";
  const silence = s.silence_s ? ` · ${s.silence_s.toFixed(1)} s silence` : "";
  const state = s.state === "ending" ? "Finishing" : "Live";
  return `${state} · ${m.frames} frames (${seconds} s)${latency}${pace}${silence}`;
}
