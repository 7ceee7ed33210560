// iwarp browser client: webcam -> WebRTC -> iwarp serve -> animated avatar back.
// No build step, no dependencies. API: see iwarp/streaming/README.md.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  token: localStorage.getItem("iwarp-token") || "",
  clientId: clientIdentity(),
  avatarId: null, // the avatar the next/current session uses (null: the server's default)
  camera: null, // MediaStream from getUserMedia
  pc: null,
  sessionId: null,
  wanted: false, // the user pressed Start and not Stop: keep reconnecting
  attempt: 0,
  reconnectTimer: null,
  statsTimer: null,
  previous: null, // last getStats sample, for rates
  engineLabel: "", // the server's engine in two words, from /healthz
};

// What the end-to-end test (and a curious user, in the console) can read.
window.iwarp = {
  state,
  framesReceived: 0,
  stats: {},
};

// A random id kept in localStorage: with the token, it makes the owner key of uploaded
// avatars, so other browsers cannot see or use them.
function clientIdentity() {
  let id = localStorage.getItem("iwarp-client");
  if (!id) {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem("iwarp-client", id);
  }
  return id;
}

// -- messages -------------------------------------------------------------------------------

// The header says what a person needs (state, the engine in two words, the frame time); the
// engine's versions and settings are in its tooltip and in /healthz.
function setStatus(text, details) {
  $("status").textContent = text;
  if (details !== undefined) $("status").title = details;
}

function showMessage(text, isError = false) {
  const box = $("message");
  box.textContent = text;
  box.classList.toggle("error", isError);
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, message, hint) {
    super(hint ? `${message} (${hint})` : message);
    this.status = status;
  }
}

// -- HTTP API -------------------------------------------------------------------------------

function headers(extra = {}) {
  const h = { "X-Iwarp-Client": state.clientId, ...extra };
  if (state.token) h.Authorization = `Bearer ${state.token}`;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    $("token-panel").hidden = false;
    throw new ApiError(401, "this server needs an access token", "enter it above");
  }
  const isJson = (response.headers.get("Content-Type") || "").includes("application/json");
  if (!response.ok) {
    const body = isJson ? await response.json() : { error: response.statusText };
    throw new ApiError(response.status, body.error || response.statusText, body.hint);
  }
  return isJson ? response.json() : response;
}

function postJson(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

// -- avatars --------------------------------------------------------------------------------

async function loadAvatars() {
  const { avatars } = await api("/avatars");
  const list = $("avatar-list");
  list.replaceChildren();
  if (state.avatarId && !avatars.some((a) => a.avatar_id === state.avatarId)) {
    state.avatarId = null;
  }
  for (const avatar of avatars) {
    const item = document.createElement("li");
    item.dataset.avatarId = avatar.avatar_id;
    const selected = state.avatarId ? state.avatarId === avatar.avatar_id : avatar.default;
    item.classList.toggle("selected", selected);
    const img = document.createElement("img");
    img.alt = `avatar ${avatar.name || avatar.avatar_id}`;
    // <img src> cannot send the token header: fetch the preview, show it as a blob URL.
    api(`/avatars/${avatar.avatar_id}/preview`)
      .then((r) => r.blob())
      .then((blob) => {
        img.src = URL.createObjectURL(blob);
      })
      .catch(() => {});
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `${avatar.name || avatar.avatar_id} (${avatar.num_sources} photo${
      avatar.num_sources > 1 ? "s" : ""
    })`;
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = selected ? "In use" : "Use";
    use.disabled = selected;
    use.addEventListener("click", () => selectAvatar(avatar.avatar_id));
    item.append(img, name, use);
    if (!avatar.public) {
      const del = document.createElement("button");
      del.type = "button";
      del.className = "secondary";
      del.textContent = "Delete";
      del.addEventListener("click", () => deleteAvatar(avatar.avatar_id));
      item.append(del);
    }
    list.append(item);
  }
}

async function selectAvatar(avatarId) {
  state.avatarId = avatarId;
  try {
    if (state.sessionId) {
      await postJson(`/sessions/${state.sessionId}`, { avatar_id: avatarId });
    }
    showMessage("");
  } catch (err) {
    showMessage(`Could not switch avatar: ${err.message}`, true);
  }
  await loadAvatars().catch(() => {});
}

async function deleteAvatar(avatarId) {
  try {
    await api(`/avatars/${avatarId}`, { method: "DELETE" });
    if (state.avatarId === avatarId) state.avatarId = null;
    await loadAvatars();
  } catch (err) {
    showMessage(`Could not delete the avatar: ${err.message}`, true);
  }
}

function previewSelectedPhotos() {
  const files = Array.from($("upload-input").files);
  const thumbs = $("upload-preview");
  thumbs.replaceChildren();
  for (const file of files) {
    const img = document.createElement("img");
    img.alt = file.name;
    img.src = URL.createObjectURL(file);
    thumbs.append(img);
  }
  $("upload-button").disabled = files.length === 0;
}

async function uploadAvatar(event) {
  event.preventDefault();
  const files = Array.from($("upload-input").files);
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  $("upload-button").disabled = true;
  showMessage(`Uploading ${files.length} photo${files.length > 1 ? "s" : ""}…`);
  try {
    const avatar = await api("/avatars", { method: "POST", body: form });
    // Done with these files: clear the picker so the next upload starts empty.
    $("upload-input").value = "";
    $("upload-preview").replaceChildren();
    await selectAvatar(avatar.avatar_id);
    // After selectAvatar, which clears old messages: the confirmation stays up.
    showMessage(
      `Avatar ready (${avatar.num_sources} photo${avatar.num_sources > 1 ? "s" : ""}) ` +
        `and selected${state.sessionId ? "" : ": press Start camera to animate it"}.`,
    );
  } catch (err) {
    const why = {
      413: "The photos are too large",
      415: "That is not a photo the server accepts",
      422: "No face was found",
    }[err.status];
    showMessage(`${why ? why + ": " : "Upload failed: "}${err.message}`, true);
  } finally {
    $("upload-button").disabled = $("upload-input").files.length === 0;
  }
}

// -- camera and connection -------------------------------------------------------------------

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showMessage(
      "This browser gives no camera access here: open the page over https, or on localhost.",
      true,
    );
    return;
  }
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
      audio: false,
    });
  } catch (err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      showMessage(
        "Camera permission denied. Allow camera access for this site (the camera icon in the " +
          "address bar), then press Start again.",
        true,
      );
    } else if (name === "NotFoundError" || name === "OverconstrainedError") {
      showMessage("No camera found. Connect a webcam, then press Start again.", true);
    } else if (name === "NotReadableError") {
      showMessage("The camera is in use by another program. Close it and press Start.", true);
    } else {
      showMessage(`Cannot open the camera: ${err}`, true);
    }
    return;
  }
  const track = state.camera.getVideoTracks()[0];
  track.addEventListener("ended", () => {
    showMessage("The camera was disconnected. Press Start to try again.", true);
    stop();
  });
  $("camera").srcObject = state.camera;
  $("camera-placeholder").hidden = true;
  $("avatar-placeholder").textContent = "Connecting to the server…";
  state.wanted = true;
  $("start").disabled = true;
  $("stop").disabled = false;
  showMessage("");
  await connect();
}

function waitForIceGathering(pc, timeoutMs) {
  // The server does not trickle candidates: send the offer once they are all in it.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function connect() {
  if (!state.wanted || !state.camera) return;
  closePeer();
  setStatus("connecting…");
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pc = pc;
  pc.addTransceiver(state.camera.getVideoTracks()[0], {
    direction: "sendrecv",
    streams: [state.camera],
  });
  pc.addEventListener("track", (event) => {
    const video = $("avatar");
    video.srcObject = event.streams[0] || new MediaStream([event.track]);
    $("avatar-placeholder").hidden = true;
    countFrames(video);
  });
  pc.addEventListener("connectionstatechange", () => onConnectionState(pc));
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, 3000);
    const body = { sdp: pc.localDescription.sdp, type: "offer" };
    if (state.avatarId) body.avatar_id = state.avatarId;
    const answer = await postJson("/offer", body);
    if (pc !== state.pc) return; // stopped or replaced meanwhile
    state.sessionId = answer.session_id;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    startStats();
  } catch (err) {
    if (pc !== state.pc) return;
    closePeer();
    if (err.status === 503) {
      scheduleReconnect("The server is full: every session slot is in use.");
    } else if (err.status === 429) {
      // This browser's other tabs (or a reloaded page's old session) hold its slots.
      scheduleReconnect(`${err.message}.`);
    } else if (err.status === 401) {
      showMessage("Enter the access token above, then press Start.", true);
      stop();
    } else if (err.status === 404 && state.avatarId) {
      state.avatarId = null; // the avatar is gone: fall back to the default
      scheduleReconnect(`The chosen avatar no longer exists; using the default.`);
    } else if (err instanceof ApiError) {
      showMessage(`The server refused the stream: ${err.message}`, true);
      stop();
    } else {
      scheduleReconnect(`Cannot reach the server (${err.message}).`);
    }
  }
}

function onConnectionState(pc) {
  if (pc !== state.pc) return;
  const s = pc.connectionState;
  if (s === "connected") {
    state.attempt = 0;
    setStatus("connected");
    showMessage("");
    $("neutral").disabled = false;
  } else if (s === "disconnected") {
    // Often a blip that recovers by itself; give it a moment before starting over.
    setStatus("connection unstable…");
    setTimeout(() => {
      if (pc === state.pc && pc.connectionState === "disconnected") {
        lostConnection();
      }
    }, 3000);
  } else if (s === "failed" || s === "closed") {
    lostConnection();
  }
}

function lostConnection() {
  closePeer();
  scheduleReconnect("Connection lost.");
}

function scheduleReconnect(reason) {
  if (!state.wanted) return;
  const delay = Math.min(10, 2 ** state.attempt);
  state.attempt += 1;
  setStatus("reconnecting…");
  showMessage(`${reason} Reconnecting in ${delay} s…`, true);
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(connect, delay * 1000);
}

function closePeer() {
  clearInterval(state.statsTimer);
  state.statsTimer = null;
  state.previous = null;
  $("neutral").disabled = true;
  if (state.pc) {
    const pc = state.pc;
    state.pc = null;
    pc.close();
  }
  if (state.sessionId) {
    // The server notices a closed connection by itself; this just frees the slot sooner.
    api(`/sessions/${state.sessionId}`, { method: "DELETE", keepalive: true }).catch(() => {});
    state.sessionId = null;
  }
}

function stop() {
  state.wanted = false;
  clearTimeout(state.reconnectTimer);
  closePeer();
  if (state.camera) {
    for (const track of state.camera.getTracks()) track.stop();
    state.camera = null;
  }
  $("camera").srcObject = null;
  $("avatar").srcObject = null;
  $("camera-placeholder").hidden = false;
  $("avatar-placeholder").hidden = false;
  $("avatar-placeholder").textContent =
    "The avatar, moving as you do, shows here once the camera is on.";
  $("start").disabled = false;
  $("stop").disabled = true;
  setStatus("stopped");
}

async function setNeutral() {
  if (!state.sessionId) return;
  try {
    await postJson(`/sessions/${state.sessionId}`, { neutral: true });
    showMessage("Neutral pose set: the avatar now moves relative to this pose.");
  } catch (err) {
    showMessage(`Could not set the neutral pose: ${err.message}`, true);
  }
}

// -- stats ----------------------------------------------------------------------------------

function countFrames(video) {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onFrame = () => {
    window.iwarp.framesReceived += 1;
    $("stat-frames").textContent = String(window.iwarp.framesReceived);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function startStats() {
  clearInterval(state.statsTimer);
  state.statsTimer = setInterval(updateStats, 1000);
}

async function updateStats() {
  const pc = state.pc;
  if (!pc) return;
  const report = await pc.getStats();
  const now = {};
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") now.inbound = s;
    if (s.type === "outbound-rtp" && s.kind === "video") now.outbound = s;
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") now.pair = s;
  });
  let server = null;
  if (state.sessionId) {
    try {
      server = await api(`/sessions/${state.sessionId}`);
    } catch (err) {
      // The server ended the session (idle, restarted, closed it): start a new one now
      // rather than wait for ICE to notice the silence.
      if (err.status === 404 && pc === state.pc) {
        state.sessionId = null;
        lostConnection();
        return;
      }
    }
  }
  const prev = state.previous;
  state.previous = now;
  if (!prev || !now.inbound || !prev.inbound) return;

  const delta = (obj, prevObj, key) => (obj && prevObj ? (obj[key] || 0) - (prevObj[key] || 0) : 0);
  const seconds = (now.inbound.timestamp - prev.inbound.timestamp) / 1000;
  const decoded = delta(now.inbound, prev.inbound, "framesDecoded");
  const fps = seconds > 0 ? decoded / seconds : 0;
  // Round trip, estimated from its parts (the camera frames carry no id the page could
  // match): encode here + network RTT + server (frame in -> animated frame out) + this
  // side's jitter buffer + decode. bench/latency.py measures the real thing per frame.
  const perFrame = (obj, prevObj, total, count) => {
    const n = delta(obj, prevObj, count);
    return n > 0 ? (1000 * delta(obj, prevObj, total)) / n : 0;
  };
  const encodeMs = perFrame(now.outbound, prev.outbound, "totalEncodeTime", "framesEncoded");
  const decodeMs = perFrame(now.inbound, prev.inbound, "totalDecodeTime", "framesDecoded");
  const bufferMs = perFrame(
    now.inbound,
    prev.inbound,
    "jitterBufferDelay",
    "jitterBufferEmittedCount",
  );
  const networkMs = now.pair && now.pair.currentRoundTripTime ? 1000 * now.pair.currentRoundTripTime : 0;
  const serverMs = server ? server.server_latency_ms.p50 : 0;
  const rtt = encodeMs + networkMs + serverMs + bufferMs + decodeMs;
  const dropped = (server ? server.frames_dropped : 0) + (now.inbound.framesDropped || 0);

  window.iwarp.stats = { fps, rtt, dropped, encodeMs, networkMs, serverMs, bufferMs, decodeMs };
  if (server && pc.connectionState === "connected") {
    setStatus(`connected · ${state.engineLabel} · ${server.model_ms.p50} ms per frame`);
  }
  $("stat-fps").textContent = fps.toFixed(1);
  $("stat-rtt").textContent = `${rtt.toFixed(0)} ms`;
  $("stat-dropped").textContent = String(dropped);
  $("stat-detail").textContent =
    `encode ${encodeMs.toFixed(1)} + network ${networkMs.toFixed(1)} + server ` +
    `${serverMs.toFixed(1)} (model ${server ? server.model_ms.p50 : "–"}) + buffer ` +
    `${bufferMs.toFixed(1)} + decode ${decodeMs.toFixed(1)} ms; dropped = skipped by the ` +
    `server to stay current (${server ? server.frames_dropped : 0}) + by this decoder ` +
    `(${now.inbound.framesDropped || 0})`;
}

// -- start-up -------------------------------------------------------------------------------

async function init() {
  try {
    const health = await api("/healthz");
    $("token-panel").hidden = true;
    state.engineLabel = health.backend_label;
    setStatus(
      `ready · ${health.backend_label}`,
      `${health.backend}; ${health.sessions} of ${health.max_sessions} streams in use`,
    );
    await loadAvatars();
  } catch (err) {
    setStatus(err.status === 401 ? "token needed" : "server unreachable");
    if (err.status !== 401) showMessage(`Cannot reach the server: ${err.message}`, true);
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token-input").value.trim();
  localStorage.setItem("iwarp-token", state.token);
  showMessage("");
  init();
});
$("start").addEventListener("click", startCamera);
$("stop").addEventListener("click", stop);
$("neutral").addEventListener("click", setNeutral);
$("upload-input").addEventListener("change", previewSelectedPhotos);
$("upload-form").addEventListener("submit", uploadAvatar);
window.addEventListener("pagehide", () => {
  if (state.pc) closePeer();
});

init();
