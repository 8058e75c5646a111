// The browser snippet of docs/clients.md, run in Chromium by browser.mjs (between the markers,
// quoted verbatim in the guide; a test checks that).

// docs: browser
/**
 * Watches a generation with the browser's EventSource; resolves with its text once done.
 * `token` is the `subscribe_token` from the creation response (EventSource cannot set an
 * Authorization header, so it rides in the query).
 */
function watchGeneration(id, token, onToken = () => {}) {
  return new Promise((resolve, reject) => {
    const query = new URLSearchParams({ token });
    const source = new EventSource(`/v1/generations/${encodeURIComponent(id)}/events?${query}`);
    let text = '';
    source.addEventListener('token', (event) => {
      const token = JSON.parse(event.data); // {index, text}; event.lastEventId === String(index)
      text += token.text;
      onToken(token);
    });
    source.addEventListener('done', (event) => {
      source.close(); // otherwise EventSource would reconnect once the stream ends
      resolve({ text, ...JSON.parse(event.data) });
    });
    source.addEventListener('error', (event) => {
      if (event.data) {
        // The generation's own terminal event: failed, cancelled or interrupted.
        source.close();
        reject(new Error(JSON.parse(event.data).message));
      } else if (source.readyState === EventSource.CLOSED) {
        reject(new Error('the stream is gone (unknown or expired generation)'));
      }
      // Otherwise the connection dropped: EventSource reconnects by itself and sends the last
      // id it saw as Last-Event-ID; the gateway resumes right after it.
    });
    // `event: reconnect` (a slow viewer, or a gateway shutting down) needs no code: the stream
    // ends and EventSource comes back after the `retry:` the gateway sent, with Last-Event-ID.
  });
}
// end docs
