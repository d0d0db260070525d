// avatar-backbone JS SDK (ES module): tokens, sessions, and WebRTC viewing through WHEP.
//
//   import { AvatarClient } from "/static/avatar.js";
//   const client = await AvatarClient.withApiKey("http://127.0.0.1:8080", "my-api-key");
//   const session = await client.createSession({ voice: "en-us", emotion: "happy" });
//   const viewer = await client.watch(session.session_id, document.querySelector("video"));
//   await client.speak(session.session_id, "Hello from the browser!");

export class AvatarError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

export class AvatarClient {
  constructor(baseUrl, token) {
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.token = token;
  }

  static async withApiKey(baseUrl, apiKey, scope = "integrator") {
    const r = await fetch(`${baseUrl.replace(/\/$/, "")}/v1/tokens`, {
      method: "POST",
      headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
      body: JSON.stringify({ scope }),
    });
    const body = await AvatarClient.#json(r);
    return new AvatarClient(baseUrl, body.token);
  }

  // The demo page's token, from a gateway started with AVATAR_DEMO_KEY.
  static async demo(baseUrl = "") {
    const r = await fetch(`${baseUrl}/v1/demo/token`, { method: "POST" });
    return new AvatarClient(baseUrl || location.origin, (await AvatarClient.#json(r)).token);
  }

  static async #json(r) {
    const body = await r.json().catch(() => ({ detail: r.statusText }));
    if (!r.ok) throw new AvatarError(r.status, body.detail || JSON.stringify(body));
    return body;
  }

  async #call(method, path, body) {
    const r = await fetch(this.baseUrl + path, {
      method,
      headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return AvatarClient.#json(r);
  }

  createSession(config = {}) { return this.#call("POST", "/v1/sessions", config); }
  getSession(id) { return this.#call("GET", `/v1/sessions/${id}`); }
  speak(id, text) { return this.#call("POST", `/v1/sessions/${id}/speak`, { text }); }
  message(id, text) { return this.#call("POST", `/v1/sessions/${id}/messages`, { text }); }
  interrupt(id) { return this.#call("POST", `/v1/sessions/${id}/interrupt`); }
  emotion(id, emotion, intensity = 1.0) {
    return this.#call("POST", `/v1/sessions/${id}/emotion`, { emotion, intensity });
  }
  end(id) { return this.#call("DELETE", `/v1/sessions/${id}`); }

  // JSON events (transcript, reply, phonemes, motion) and binary media over a WebSocket.
  // A lost connection (a gateway restart) is opened again to the same session, waiting
  // 100 ms and doubling up to `maxBackoffMs`; onEvent then gets {type: "reconnected",
  // attempts} (the gateway starts each connection's video at a keyframe). A refused token
  // (close code 4401/4403) is final.
  // Returns { send(data), close(), socket }.
  events(id, onEvent, token = this.token, { reconnect = true, maxBackoffMs = 2000 } = {}) {
    const url = new URL(`${this.baseUrl}/v1/sessions/${id}/ws`);
    url.protocol = url.protocol.replace("http", "ws");
    url.searchParams.set("token", token);
    let closed = false;
    let attempts = 0;
    const handle = {
      socket: null,
      send(data) { handle.socket.send(data); },
      close() { closed = true; handle.socket.close(); },
    };
    const open = () => {
      const ws = new WebSocket(url);
      handle.socket = ws;
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        if (attempts) onEvent({ type: "reconnected", attempts }, null);
        attempts = 0;
      };
      ws.onmessage = (m) => {
        if (typeof m.data === "string") { onEvent(JSON.parse(m.data), null); return; }
        const view = new DataView(m.data);
        const n = view.getUint32(0);
        const head = JSON.parse(new TextDecoder().decode(new Uint8Array(m.data, 4, n)));
        onEvent(head, new Uint8Array(m.data, 4 + n));
      };
      // A connection that never opens may report only an error (Node's WebSocket does):
      // either event schedules the one retry of this socket.
      let retried = false;
      const retry = (code) => {
        if (retried || closed || !reconnect || code === 4401 || code === 4403) return;
        retried = true;
        attempts += 1;
        setTimeout(open, Math.min(maxBackoffMs, 100 * 2 ** Math.min(attempts - 1, 10)));
      };
      ws.onerror = () => retry(0);
      ws.onclose = (e) => retry(e.code);
    };
    open();
    return handle;
  }

  // Watch a session in `video` (audio included). Pass a microphone MediaStream to speak to
  // the avatar (integrator tokens only). Resolves once the answer is applied.
  async watch(id, video, { token = this.token, microphone = null } = {}) {
    const pc = new RTCPeerConnection();
    pc.addTransceiver("video", { direction: "recvonly" });
    const mic = microphone && microphone.getAudioTracks()[0];
    if (mic) pc.addTransceiver(mic, { direction: "sendrecv" });
    else pc.addTransceiver("audio", { direction: "recvonly" });
    const stream = new MediaStream();
    pc.ontrack = (e) => {
      stream.addTrack(e.track);
      video.srcObject = stream;
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {  // WHEP without trickle: every candidate in the offer
      if (pc.iceGatheringState === "complete") return resolve();
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") resolve();
      });
      setTimeout(resolve, 3000);
    });
    const r = await fetch(`${this.baseUrl}/whep/${id}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    if (r.status !== 201) {
      pc.close();
      const body = await r.json().catch(() => ({ detail: r.statusText }));
      throw new AvatarError(r.status, body.detail);
    }
    const resource = r.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
    const baseUrl = this.baseUrl;
    return {
      pc,
      stream,
      async stop() {
        pc.close();
        await fetch(baseUrl + resource, {
          method: "DELETE", headers: { Authorization: `Bearer ${token}` },
        }).catch(() => {});
      },
    };
  }
}
