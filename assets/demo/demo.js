// tokenfan demo page: creates a generation, watches it with several native EventSources, and
// shows the gateway's figures from /metrics. Plain browser JavaScript, no build step.
'use strict';

const VIEWER_COUNT = 3;
const METRICS_EVERY_MS = 1000;

const $ = (selector, root = document) => root.querySelector(selector);

/** One viewer: its own EventSource on the generation's event stream. */
class Viewer {
  constructor(number, onEnd) {
    this.number = number;
    this.onEnd = onEnd;
    this.root = $('#viewer-template').content.firstElementChild.cloneNode(true);
    this.root.id = `viewer-${number}`;
    $('h3', this.root).textContent = `Viewer ${number}`;
    this.output = $('.output', this.root);
    this.output.setAttribute('aria-label', `Viewer ${number} output`);
    // One live region is enough: several reading the same text aloud would drown each other.
    this.output.setAttribute('aria-live', number === 1 ? 'polite' : 'off');
    this.toggle = $('.toggle', this.root);
    this.toggle.setAttribute('aria-label', `Drop viewer ${number}`);
    this.toggle.addEventListener('click', () => (this.source ? this.drop() : this.reopen()));
    this.source = null;
  }

  /** Starts watching a generation from its first token; `token` is its subscribe token. */
  watch(generationId, token) {
    this.close();
    this.generationId = generationId;
    this.token = token;
    this.next = 0; // the first token id this viewer lacks
    this.output.textContent = '';
    $('.resumed', this.root).textContent = '';
    $('.instance', this.root).textContent = '';
    delete $('.instance', this.root).dataset.instance;
    this.root.dataset.anomalies = '0';
    this.updateCounts();
    this.connect();
  }

  /**
   * Opens an EventSource; `last_event_id` resumes after the last token shown. EventSource
   * cannot set headers, so the subscribe token rides in the query too.
   */
  connect() {
    const query = new URLSearchParams({ token: this.token });
    if (this.next > 0) query.set('last_event_id', String(this.next - 1));
    const path = `/v1/generations/${encodeURIComponent(this.generationId)}/events`;
    const source = new EventSource(`${path}?${query}`);
    this.source = source;
    this.setState('connecting');
    this.setToggle('Drop', false);
    let opens = 0;
    source.addEventListener('open', () => {
      // Every open after the first token is a resume: the first open of a source is the reopen
      // button's; a later one is EventSource's own reconnect, which sends the last `id:` it saw
      // as the Last-Event-ID header.
      opens += 1;
      const how = opens === 1 ? 'reopened' : 'reconnected by itself';
      if (this.next > 0) this.noteResume(this.next - 1, how);
      this.setState('live');
    });
    source.addEventListener('instance', (event) => this.onInstance(JSON.parse(event.data)));
    source.addEventListener('token', (event) => this.onToken(JSON.parse(event.data)));
    source.addEventListener('done', (event) => this.end('done', JSON.parse(event.data)));
    source.addEventListener('reconnect', (event) => {
      // The gateway ended this stream (slow viewer, or shutting down): EventSource comes back
      // by itself after the `retry:` delay, with Last-Event-ID.
      this.setState('reconnecting', JSON.parse(event.data).reason);
    });
    source.addEventListener('error', (event) => {
      if (event.data !== undefined) {
        // The generation's own `error` event: failed, cancelled or interrupted. Terminal.
        this.end('error', JSON.parse(event.data));
      } else if (source.readyState === EventSource.CLOSED) {
        // EventSource gave up (e.g. the generation expired: 404).
        this.close();
        this.setState('closed');
        this.setToggle('Reopen', false);
      } else {
        // The connection dropped: EventSource reconnects by itself with Last-Event-ID.
        this.setState('reconnecting');
      }
    });
  }

  /**
   * With several gateway instances on a shared store, each stream first names the instance
   * serving it: show it, and where the viewer came from when it moved (a drain hands viewers
   * over; the text goes on without a gap).
   */
  onInstance({ instance }) {
    const shown = $('.instance', this.root);
    const previous = shown.dataset.instance;
    shown.dataset.instance = instance;
    shown.textContent =
      previous && previous !== instance ? `· via ${instance} (was ${previous})` : `· via ${instance}`;
  }

  onToken({ index, text }) {
    if (index !== this.next) {
      // A gap or a repeat would be a gateway bug: make it visible rather than hide it.
      this.root.dataset.anomalies = String(Number(this.root.dataset.anomalies) + 1);
      if (index < this.next) return;
    }
    const atBottom =
      this.output.scrollTop + this.output.clientHeight >= this.output.scrollHeight - 4;
    this.output.append(text);
    if (atBottom) this.output.scrollTop = this.output.scrollHeight;
    this.next = index + 1;
    this.updateCounts();
  }

  /** A terminal event: close, or EventSource would reconnect after the stream's end. */
  end(kind, data) {
    this.close();
    const detail = kind === 'done' ? data.finish_reason || data.status : data.code;
    this.setState(kind, detail);
    this.setToggle('Drop', true);
    this.onEnd(data);
  }

  drop() {
    this.close();
    this.setState('dropped');
    this.setToggle('Reopen', false);
  }

  reopen() {
    this.connect();
  }

  close() {
    if (this.source) this.source.close();
    this.source = null;
  }

  noteResume(afterId, how) {
    $('.resumed', this.root).textContent = `· ${how}, resumed after id ${afterId}`;
  }

  setState(state, detail) {
    this.root.dataset.state = state;
    $('.state', this.root).textContent = detail ? `${state}: ${detail}` : state;
  }

  setToggle(label, disabled) {
    this.toggle.textContent = label;
    this.toggle.disabled = disabled;
    this.toggle.setAttribute('aria-label', `${label} viewer ${this.number}`);
  }

  updateCounts() {
    $('.tokens', this.root).textContent = String(this.next);
    $('.last-id', this.root).textContent = this.next > 0 ? String(this.next - 1) : '–';
    this.root.dataset.next = String(this.next);
  }
}

/** Prometheus text → metric name → value, summed over label sets. */
function parsePrometheus(text) {
  const values = new Map();
  for (const line of text.split('\n')) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(\S+)/.exec(line);
    if (!match) continue; // comments (# HELP, # TYPE) and blank lines
    const value = Number(match[2]);
    if (Number.isFinite(value)) values.set(match[1], (values.get(match[1]) || 0) + value);
  }
  return values;
}

/** Polls /metrics and shows a few figures; tokens/s is the rate of tokenfan_tokens_total. */
function startFigures() {
  let previous = null;
  const show = (name, value) => {
    $(`[data-figure="${name}"]`).textContent = value;
  };
  async function poll() {
    try {
      const response = await fetch('/metrics', { cache: 'no-store' });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const metrics = parsePrometheus(await response.text());
      const get = (name) => metrics.get(name) || 0;
      const now = performance.now();
      const tokens = get('tokenfan_tokens_total');
      show('connections', get('tokenfan_connections_open'));
      show('subscribers', get('tokenfan_subscribers_open'));
      show('running', get('tokenfan_generations_running'));
      show('started', get('tokenfan_generations_started_total'));
      show('evictions', get('tokenfan_evictions_total'));
      if (previous) {
        const rate = (tokens - previous.tokens) / ((now - previous.at) / 1000);
        show('tokens-per-second', Math.max(0, rate).toFixed(1));
      }
      previous = { tokens, at: now };
      $('#figures-note').textContent = 'From /metrics, every second.';
    } catch (error) {
      $('#figures-note').textContent = `Metrics unavailable: ${error.message}`;
    } finally {
      setTimeout(poll, METRICS_EVERY_MS);
    }
  }
  poll();
}

function startPage() {
  const status = $('#generation');
  const generate = $('#generate');
  const stop = $('#stop');
  let generationId = null;
  // The API key, when the gateway has keys, goes on backend calls only; viewers use the
  // generation's subscribe token.
  const backendHeaders = (extra = {}) => {
    const key = $('#api-key').value.trim();
    return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
  };

  const showGeneration = (text, id) => {
    status.textContent = text;
    if (id) {
      const link = document.createElement('a');
      link.href = `/v1/generations/${id}`;
      link.textContent = 'snapshot';
      status.append(' (', link, ')');
    }
  };
  const onEnd = (data) => {
    stop.disabled = true;
    showGeneration(`Generation ${generationId} ${data.status} (${data.token_count} tokens)`, generationId);
  };

  const viewers = [];
  for (let number = 1; number <= VIEWER_COUNT; number += 1) {
    const viewer = new Viewer(number, onEnd);
    viewers.push(viewer);
    $('#viewers').append(viewer.root);
  }

  $('#prompt-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    generate.disabled = true;
    try {
      const response = await fetch('/v1/generations', {
        method: 'POST',
        headers: backendHeaders({ 'content-type': 'application/json' }),
        body: JSON.stringify({
          model: $('#model').value,
          messages: [{ role: 'user', content: $('#prompt').value }],
        }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
      generationId = body.id;
      showGeneration(`Generation ${generationId} running`, generationId);
      stop.disabled = false;
      for (const viewer of viewers) viewer.watch(generationId, body.subscribe_token);
    } catch (error) {
      showGeneration(`Could not start a generation: ${error.message}`);
    } finally {
      generate.disabled = false;
    }
  });

  // Ctrl+Enter (Cmd+Enter) in the prompt submits, as in most chat boxes.
  $('#prompt').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $('#prompt-form').requestSubmit();
    }
  });

  stop.addEventListener('click', async () => {
    stop.disabled = true;
    await fetch(`/v1/generations/${generationId}`, { method: 'DELETE', headers: backendHeaders() });
  });

  startFigures();
}

document.addEventListener('DOMContentLoaded', startPage);
