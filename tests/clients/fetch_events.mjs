// The fetch-based snippet of docs/clients.md (Node.js 18+, Deno, browsers, workers), run by
// fetch_client.mjs. Between the markers it is quoted verbatim in the guide; a test checks that.

// docs: fetch
/**
 * Follows a generation's events with fetch, for clients without EventSource or that need
 * their own headers. `token`: the generation's `subscribe_token` (or an API key). Resumes
 * after `lastEventId` and after every dropped connection.
 */
export async function followGeneration(baseUrl, id, { token, lastEventId = null, onToken = () => {} } = {}) {
  const url = `${baseUrl}/v1/generations/${encodeURIComponent(id)}/events`;
  let text = '';
  for (;;) {
    let retryMs = 1000;
    try {
      const headers = { authorization: `Bearer ${token}` };
      if (lastEventId !== null) headers['last-event-id'] = String(lastEventId);
      const response = await fetch(url, { headers });
      if (response.status === 204) return { text }; // nothing after lastEventId
      if (!response.ok) throw new Error(`HTTP ${response.status}`); // 404: unknown or expired
      let buffer = '';
      for await (const chunk of response.body.pipeThrough(new TextDecoderStream())) {
        buffer += chunk;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const event = { event: 'message', data: '' };
          for (const line of buffer.slice(0, end).split('\n')) {
            const colon = line.indexOf(':');
            if (colon <= 0) continue; // comments (keep-alives) and blank lines
            event[line.slice(0, colon)] = line.slice(colon + 1).replace(/^ /, '');
          }
          buffer = buffer.slice(end + 2);
          if (event.id !== undefined) lastEventId = event.id;
          if (event.retry !== undefined) retryMs = Number(event.retry);
          const data = event.data ? JSON.parse(event.data) : null;
          if (event.event === 'token') {
            text += data.text;
            onToken(data);
          } else if (event.event === 'done') {
            return { text, ...data };
          } else if (event.event === 'error') {
            throw Object.assign(new Error(data.message), { terminal: true, ...data });
          }
          // `reconnect`: the stream ends next; we come back after retryMs.
        }
      }
    } catch (error) {
      if (error.terminal || error.message.startsWith('HTTP ')) throw error;
      // A dropped connection: come back below and resume after lastEventId.
    }
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
}
// end docs
