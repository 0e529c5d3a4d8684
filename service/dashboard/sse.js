// Server-Sent Events over fetch(): the API authenticates the stream with the Authorization header,
// which EventSource cannot send, so the stream is read with a ReadableStream reader and parsed here.

/** Split an SSE text buffer into complete frames; returns [frames, rest]. */
export function parseFrames(buffer) {
  const frames = [];
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    const frame = { event: "message", data: [], id: null };
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;  // comment: keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") frame.event = value;
      else if (field === "data") frame.data.push(value);
      else if (field === "id") frame.id = value;
    }
    if (frame.data.length) frames.push({ ...frame, data: frame.data.join("\n") });
  }
  return [frames, rest];
}

/**
 * Follow `url` until the server sends `end` or `signal` aborts; reconnects after a dropped
 * connection with Last-Event-ID, so no event is shown twice. `onFrame({event, data, id})`.
 */
export async function followStream(url, key, onFrame, signal, onError) {
  let lastId = null;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${key}`, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(url, { headers, signal });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        onError(body.error?.message || `the event stream answered ${response.status}`);
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const [frames, rest] = parseFrames(buffer + value);
        buffer = rest;
        for (const frame of frames) {
          if (frame.id) lastId = frame.id;
          onFrame(frame);
          if (frame.event === "end") return;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      onError(`event stream interrupted (${e.message}); reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}
