// Headless Chromium on the demo page, driven by tests/clients.rs:
//   node browser.mjs <gateway base URL> <API key> <screenshot path>
// Prints one JSON report on stdout; progress goes to stderr.
//
// The page is loaded through a TCP proxy in this script, so that the test can cut the
// connections carrying the viewers' event streams mid-stream: a real network failure, after
// which only the browser's own EventSource logic (reconnect, Last-Event-ID) can recover. The
// proxy also records each request head as it crossed the wire, which is how the test sees the
// Last-Event-ID headers and counts reconnects.
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { launchChromium, waitFor } from './chromium.mjs';

const [gateway, apiKey, screenshotPath] = process.argv.slice(2);
const target = new URL(gateway);
const log = (...args) => console.error('[browser]', ...args);

/** Chromium's reconnection time when the server sent no `retry:` (3 s), plus a margin. */
const NATIVE_RETRY_MS = 3000;
const QUIET_AFTER_DONE_MS = NATIVE_RETRY_MS + 700;

/** A byte pump that notes request heads and can cut the connections of event streams. */
function startProxy() {
  const requests = []; // { path, lastEventId, at }
  const streams = new Set(); // client sockets whose latest request is an event stream
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    let pending = '';
    let bodyLeft = 0; // bytes of a request body still to skip before the next head
    client.on('data', (chunk) => {
      pending += chunk.toString('latin1');
      for (;;) {
        const skipped = Math.min(bodyLeft, pending.length);
        pending = pending.slice(skipped);
        bodyLeft -= skipped;
        const head = /^(GET|POST|DELETE|HEAD) (\S+) HTTP\/1\.1\r\n([\s\S]*?)\r\n\r\n/.exec(pending);
        if (bodyLeft > 0 || !head) break;
        pending = pending.slice(head[0].length);
        const header = (name) => new RegExp(`^${name}: *(.*)$`, 'im').exec(head[3])?.[1].trim();
        bodyLeft = Number(header('content-length') || 0);
        const path = head[2];
        requests.push({ path, lastEventId: header('last-event-id') ?? null, at: Date.now() });
        if (/\/events(\?|$)/.test(path)) streams.add(client);
        else streams.delete(client);
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => client.write(chunk));
    const close = () => {
      streams.delete(client);
      client.destroy();
      upstream.destroy();
    };
    client.on('close', close).on('error', close);
    upstream.on('close', close).on('error', close);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      resolve({
        url: `http://127.0.0.1:${server.address().port}`,
        requests,
        /** Resets every connection that is carrying an event stream; returns how many. */
        cutStreams() {
          const cut = [...streams];
          for (const socket of cut) socket.resetAndDestroy();
          return cut.length;
        },
        close: () => server.close(),
      });
    });
  });
}

const viewerState = (page) =>
  page.$$eval('.viewer', (viewers) =>
    viewers.map((v) => ({
      id: v.id,
      state: v.dataset.state,
      next: Number(v.dataset.next || 0),
      anomalies: Number(v.dataset.anomalies || 0),
      text: v.querySelector('.output').textContent,
      resumed: v.querySelector('.resumed').textContent,
    })),
  );

async function main() {
  const proxy = await startProxy();
  const browser = await launchChromium();
  const report = { pageErrors: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => report.pageErrors.push(String(error)));
    page.on('console', (message) => {
      // The resets this test causes are logged by the browser; anything else is a finding.
      const expected = message.text().includes('net::ERR_CONNECTION_RESET');
      if (message.type() === 'error' && !expected) report.pageErrors.push(message.text());
    });

    await page.goto(`${proxy.url}/`);
    report.title = await page.title();

    // Create a generation from the page, with the keyboard as a user would.
    await page.getByRole('textbox', { name: 'Prompt' }).fill('Tell me a story about a river.');
    await page.getByLabel('API key').fill(apiKey);
    await page.getByRole('button', { name: 'Generate' }).focus();
    await page.keyboard.press('Enter');
    report.generationId = await waitFor('the generation id', () =>
      page.$eval('#generation', (e) => /gen_[0-9a-f]{32}/.exec(e.textContent)?.[0]),
    );
    log('generation', report.generationId);
    // The subscribe token the page received, as its viewers use it (URL-encoded by the page).
    report.subscribeToken = await waitFor('the viewers to open', () =>
      proxy.requests
        .map((r) => /[?&]token=([^&]+)/.exec(r.path)?.[1])
        .find((token) => token !== undefined),
    );

    // Viewer 3 is dropped and reopened with the page's button: it resumes with ?last_event_id=.
    await waitFor('five tokens in viewer 3', async () => (await viewerState(page))[2].next >= 5);
    await page.getByRole('button', { name: 'Drop viewer 3' }).click();
    report.manualDropAfter = (await viewerState(page))[2].next - 1;
    await page.waitForTimeout(300);
    await page.getByRole('button', { name: 'Reopen viewer 3' }).click();
    await waitFor('viewer 3 to reopen', async () =>
      (await viewerState(page))[2].resumed.includes('reopened'),
    );
    report.reopenedLabel = (await viewerState(page))[2].resumed;

    // Mid-stream, cut every viewer's connection: only EventSource's own reconnect can help.
    await waitFor('fifteen tokens in every viewer', async () =>
      (await viewerState(page)).every((v) => v.state === 'live' && v.next >= 15),
    );
    report.beforeCut = (await viewerState(page)).map((v) => v.next - 1);
    report.cut = proxy.cutStreams();
    report.cutAt = Date.now();
    log('cut', report.cut, 'streams after ids', report.beforeCut);
    await waitFor('a viewer to notice the drop', async () =>
      (await viewerState(page)).some((v) => v.state === 'reconnecting'),
    );
    await waitFor('every viewer to come back by itself', async () =>
      (await viewerState(page)).every((v) => v.resumed.includes('reconnected by itself')),
    );

    await waitFor('every viewer to receive done', async () =>
      (await viewerState(page)).every((v) => v.state === 'done'),
    );
    report.doneAt = Date.now();
    const demoEvents = (r) => r.path.startsWith(`/v1/generations/${report.generationId}/events`);
    report.requestsAtDone = proxy.requests.filter(demoEvents).length;
    await page.screenshot({ path: screenshotPath, fullPage: true });

    // Meanwhile, the guide's browser snippet (watch.js) follows a second, short generation.
    const snippet = await readFile(new URL('./watch.js', import.meta.url), 'utf8');
    report.snippet = await page.evaluate(`${snippet}
      (async () => {
        const response = await fetch('/v1/generations', {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: 'Bearer ${apiKey}' },
          body: JSON.stringify({
            model: 'tokenfan-mock',
            messages: [{ role: 'user', content: 'Hello' }],
            mock: { tokens: 20, interval_ms: 5 },
          }),
        });
        const { id, subscribe_token: token } = await response.json();
        const indices = [];
        const result = await watchGeneration(id, token, (t) => indices.push(t.index));
        return { id, indices, ...result };
      })()`);

    // After `done` the page has closed its EventSources: nothing may come back, not even after
    // the browser's reconnection time.
    await page.waitForTimeout(Math.max(0, QUIET_AFTER_DONE_MS - (Date.now() - report.doneAt)));
    report.viewers = await viewerState(page);
    report.figures = await page.$$eval('[data-figure]', (figures) =>
      Object.fromEntries(figures.map((f) => [f.dataset.figure, f.textContent])),
    );
    report.eventRequests = proxy.requests
      .filter(demoEvents)
      .map(({ path, lastEventId, at }) => ({ path, lastEventId, afterCutMs: at - report.cutAt }));
  } finally {
    await browser.close();
    proxy.close();
  }
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
