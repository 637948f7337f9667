// One-Forcing live studio page: plays the frames the server makes at the video's frame rate, sends control
// messages (see studio/protocol.py) and acknowledges what it has shown (back-pressure).
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_HEADER_BYTES = 12;

const studio = {  // the page's state (window.studio, for reading in the browser's console)
  token: null, fps: 16, branch: null, blocks: [], prompts: [], kept: new Set(), queue: [],
  paused: false, shown: 0, lastFrame: -1, errors: [], take: null,
};
window.studio = studio;

let socket = null;
let timer = null;

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind || "";
  box.hidden = !text;
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => { $("connection").textContent = "connected"; };
  socket.onclose = () => { $("connection").textContent = "disconnected (reload the page to start again)"; };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onEvent(JSON.parse(event.data));
    else onFrame(event.data);
  };
}

const handlers = {
  hello(e) {
    studio.token = e.token;
    studio.fps = e.fps;
    restart();
  },
  take(e) {
    studio.take = e;
    studio.queue = [];
    studio.lastFrame = -1;
    const canvas = $("video");
    canvas.width = e.width;
    canvas.height = e.height;
    $("command").textContent = "Reproduce the current branch: " + e.command;
    startPlayback(e.fps);
  },
  branch(e) {
    const changed = studio.branch !== e.id;
    studio.branch = e.id;
    studio.blocks = e.blocks;
    studio.prompts = e.prompts;
    if (changed) {
      studio.queue = studio.queue.filter((f) => f.branch === e.id);
      studio.lastFrame = e.blocks.reduce((n, b) => n + b.frames, 0) - 1;
    }
    const select = $("branch");
    select.replaceChildren(...e.branches.map((b) => {
      const option = document.createElement("option");
      option.value = b.id;
      option.textContent = b.parent === null ? `branch ${b.id}`
        : `branch ${b.id}, from ${b.parent} at frame ${b.fork_frame}`;
      return option;
    }));
    select.value = e.id;
    updateDownloads();
    drawTimeline();
  },
  block(e) {
    if (e.branch !== studio.branch) return;
    studio.blocks.push({ index: e.index, first_frame: e.first_frame, frames: e.frames });
    const last = studio.prompts[studio.prompts.length - 1];
    if (!last || last.prompt !== e.prompt) studio.prompts.push({ frame: e.first_frame, prompt: e.prompt });
    updateDownloads();
    drawTimeline();
  },
  stats(e) {
    $("fps-made").textContent = e.frames_per_second.toFixed(1);
    $("block-ms").textContent = e.block_ms.toFixed(0);
    if (e.prompt_latency_ms !== null) $("latency-ms").textContent = e.prompt_latency_ms.toFixed(0);
  },
  snapshots(e) {
    studio.kept = new Set(e.kept_blocks);
    const mb = (bytes) => (bytes / 2 ** 20).toFixed(1);
    $("memory").textContent = `rewind snapshots: ${e.count} of at most ${e.max_count} kept, ${mb(e.bytes)} MB of `
      + `${mb(e.budget_bytes)} MB · frames kept for download: ${mb(e.history_bytes)} MB of `
      + `${mb(e.history_budget_bytes)} MB` + (e.first_kept_frame > 0 ? ` (from frame ${e.first_kept_frame})` : "");
    drawTimeline();
  },
  paused(e) {
    studio.paused = e.paused;
    $("pause").textContent = e.paused ? "Resume" : "Pause";
  },
  error(e) {
    studio.errors.push(e);
    showMessage(e.message, "");
  },
};

function onEvent(event) {
  const handle = handlers[event.type];
  if (handle) handle(event);
}

let decoding = Promise.resolve();

function onFrame(buffer) {  // decoded one after another, so frames keep their order
  decoding = decoding.then(() => decodeFrame(buffer));
}

async function decodeFrame(buffer) {
  const header = new DataView(buffer, 0, FRAME_HEADER_BYTES);
  const branch = header.getUint32(0, true);
  const frame = header.getUint32(4, true);
  const bitmap = await createImageBitmap(new Blob([buffer.slice(FRAME_HEADER_BYTES)], { type: "image/jpeg" }));
  if (branch === studio.branch) studio.queue.push({ branch, frame, bitmap });
}

function startPlayback(fps) {
  if (timer) clearInterval(timer);
  let played = 0;
  let since = performance.now();
  timer = setInterval(() => {
    $("buffered").textContent = studio.queue.length;
    if (studio.paused || studio.queue.length === 0) return;
    const next = studio.queue.shift();
    $("video").getContext("2d").drawImage(next.bitmap, 0, 0);
    next.bitmap.close();
    studio.shown += 1;
    studio.lastFrame = next.frame;
    send({ type: "played", branch: next.branch, frame: next.frame });
    $("frame-no").textContent = next.frame;
    played += 1;
    const now = performance.now();
    if (now - since > 1000) {
      $("fps-play").textContent = (played * 1000 / (now - since)).toFixed(1);
      played = 0;
      since = now;
    }
    drawPlayhead();
  }, 1000 / fps);
}

function totalFrames() {
  return studio.blocks.reduce((n, b) => n + b.frames, 0);
}

function frameX(frame, width) {
  return 8 + (width - 16) * frame / Math.max(totalFrames(), 1);
}

function drawTimeline() {
  const box = $("timeline");
  const width = box.clientWidth;
  const items = [];
  studio.prompts.forEach((p) => {
    const mark = document.createElement("div");
    mark.className = "prompt-mark";
    mark.style.left = `${frameX(p.frame, width)}px`;
    mark.textContent = p.prompt.length > 40 ? p.prompt.slice(0, 37) + "…" : p.prompt;
    mark.title = `frame ${p.frame}: ${p.prompt}`;
    items.push(mark);
  });
  const boundaries = studio.blocks.map((b) => b.first_frame).concat([totalFrames()]);
  boundaries.forEach((frame, block) => {
    const tick = document.createElement("button");
    tick.className = "tick" + (studio.kept.has(block) ? "" : " gone");
    tick.style.left = `${frameX(frame, width)}px`;
    tick.dataset.block = block;
    tick.dataset.frame = frame;
    tick.title = `block ${block}, frame ${frame}`;
    tick.addEventListener("click", () => rewind(block));
    items.push(tick);
  });
  const head = document.createElement("div");
  head.className = "playhead";
  head.id = "playhead";
  items.push(head);
  box.replaceChildren(...items);
  drawPlayhead();
}

function drawPlayhead() {
  const head = $("playhead");
  if (head) head.style.left = `${frameX(Math.max(studio.lastFrame, 0), $("timeline").clientWidth)}px`;
}

function updateDownloads() {
  const ready = studio.token !== null && studio.blocks.length > 0;
  for (const [id, name] of [["download-mp4", "branch.mp4"], ["download-schedule", "schedule.json"]]) {
    const link = $(id);
    link.href = ready ? `/download/${studio.token}/${studio.branch}/${name}` : "#";
    link.classList.toggle("disabled", !ready);
  }
}

function restart() {
  showMessage("");
  const seed = Number($("seed").value);
  if (!Number.isInteger(seed) || seed < 0) {
    showMessage("the seed must be a whole number >= 0");
    return;
  }
  send({ type: "restart", seed, prompt: $("prompt").value });
}

function rewind(block) {
  showMessage("");
  send({ type: "rewind", block, prompt: $("prompt").value });
}

$("prompt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showMessage("");
  send({ type: "prompt", text: $("prompt").value });
});
$("pause").addEventListener("click", () => send({ type: studio.paused ? "resume" : "pause" }));
$("restart").addEventListener("click", restart);
$("branch").addEventListener("change", (event) => send({ type: "select", branch: Number(event.target.value) }));
window.addEventListener("resize", drawTimeline);
connect();
