// Runs the fetch-based snippet (fetch_events.mjs) in Node.js against tokenfan, driven by
// tests/clients.rs: node fetch_client.mjs <gateway base URL>. Prints one JSON report.
import { followGeneration } from './fetch_events.mjs';

const [baseUrl, apiKey] = process.argv.slice(2);
const response = await fetch(`${baseUrl}/v1/generations`, {
  method: 'POST',
  headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}` },
  body: JSON.stringify({
    model: 'tokenfan-mock',
    messages: [{ role: 'user', content: 'Tell me a story' }],
    mock: { tokens: 30, interval_ms: 5 },
  }),
});
const { id, subscribe_token: token } = await response.json();
const indices = [];
const whole = await followGeneration(baseUrl, id, { token, onToken: (t) => indices.push(t.index) });
// A client that had tokens 0..=9 resumes after id 9.
const resumed = await followGeneration(baseUrl, id, { token, lastEventId: 9 });
// After the terminal event (id = token_count) there is nothing left: 204.
const afterEnd = await followGeneration(baseUrl, id, { token, lastEventId: whole.token_count });
process.stdout.write(`${JSON.stringify({ id, indices, whole, resumed, afterEnd })}\n`);
