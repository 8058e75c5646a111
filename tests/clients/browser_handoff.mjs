// Headless Chromium on the demo page of two gateway instances sharing a store, driven by
// tests/clients.rs:
//   node browser_handoff.mjs <instance URLs, comma-separated> <pid of the first> <screenshot>
// Prints one JSON report on stdout; progress goes to stderr.
//
// The page is loaded through a small load balancer in this script, as a Kubernetes Service
// would route: each new connection goes to the first instance whose /readyz answers 200. Mid-
// generation the script sends SIGTERM to the first instance (the generation's owner): its
// viewers are told to reconnect, the balancer sends them to the second instance, and the page
// shows each viewer's instance change while its text goes on without a gap.
import net from 'node:net';
import { launchChromium, waitFor } from './chromium.mjs';

const [targetList, ownerPid, screenshotPath] = process.argv.slice(2);
const targets = targetList.split(',').map((url) => new URL(url));
const log = (...args) => console.error('[browser-handoff]', ...args);

/** Which targets answered /readyz with 200 at the last look (every 100 ms). */
const ready = targets.map(() => true);
async function watchReadiness(stop) {
  while (!stop.stopped) {
    await Promise.all(
      targets.map(async (target, i) => {
        try {
          const response = await fetch(new URL('/readyz', target), { signal: AbortSignal.timeout(500) });
          ready[i] = response.ok;
        } catch {
          ready[i] = false;
        }
      }),
    );
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function startBalancer() {
  const routed = targets.map(() => 0);
  const server = net.createServer((client) => {
    const i = Math.max(0, ready.indexOf(true));
    routed[i] += 1;
    const upstream = net.connect(Number(targets[i].port), targets[i].hostname);
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () =>
      resolve({ url: `http://127.0.0.1:${server.address().port}`, routed, close: () => server.close() }),
    );
  });
}

const viewerState = (page) =>
  page.$$eval('.viewer', (viewers) =>
    viewers.map((v) => ({
      state: v.dataset.state,
      next: Number(v.dataset.next || 0),
      anomalies: Number(v.dataset.anomalies || 0),
      text: v.querySelector('.output').textContent,
      instance: v.querySelector('.instance').textContent,
    })),
  );

async function main() {
  const readiness = { stopped: false };
  const watching = watchReadiness(readiness);
  const balancer = await startBalancer();
  const browser = await launchChromium();
  const report = { pageErrors: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => report.pageErrors.push(String(error)));
    await page.goto(`${balancer.url}/`);
    await page.getByRole('textbox', { name: 'Prompt' }).fill('Tell me a story about a river.');
    await page.getByRole('button', { name: 'Generate' }).click();
    report.generationId = await waitFor('the generation id', () =>
      page.$eval('#generation', (e) => /gen_[0-9a-f]{32}/.exec(e.textContent)?.[0]),
    );
    await waitFor('ten tokens in every viewer, served by the first instance', async () =>
      (await viewerState(page)).every((v) => v.next >= 10 && v.instance.includes('via')),
    );
    report.beforeDrain = await viewerState(page);
    log('SIGTERM to', ownerPid);
    process.kill(Number(ownerPid), 'SIGTERM');
    await waitFor('every viewer to end', async () =>
      (await viewerState(page)).every((v) => v.state === 'done' || v.state === 'error'),
    );
    report.viewers = await viewerState(page);
    report.routed = balancer.routed;
    await page.screenshot({ path: screenshotPath, fullPage: true });
  } finally {
    readiness.stopped = true;
    await watching;
    await browser.close();
    balancer.close();
  }
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
