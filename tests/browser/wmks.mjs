#!/usr/bin/env node
// Drives VMware's own WebMKS client, wmks.js (npm opennebula-wmks), in
// Debian's headless Chromium and reports what happened to its console
// connection: the connection states wmks.js reported, the WebSocket's
// negotiated subprotocol and close code, whether the canvas shows a picture
// (more than one colour), and how long the connection stayed up.
//
//   node tests/browser/wmks.mjs --page-base http://127.0.0.1:PORT[/prefix]
//        --ws-url ws(s)://HOST:PORT/PATH --out-dir DIR --watch-ms N
//        [--options JSON] [--chromium /usr/lib/chromium/chromium] [--timeout-ms N]
//
// The page is PAGE_BASE/wmks-test.html (tests/browser/wmks-test.html, served
// over http next to wmks.js). Steps: load it; wait (at most --timeout-ms) for
// wmks.js to reach "connected" or "disconnected"; once connected, watch for
// --watch-ms ms, sampling the canvas, and stop early when the connection
// drops; then save DIR/wmks.png (a screenshot) and DIR/wmks.json (the
// result) and print the result as one line `wmks.mjs: result {...}`.
//
// The result, times in ms since the page called connect():
//   connected, connected_ms, disconnected_ms, dropped (disconnected within
//   the watch), stayed_connected_ms (connected until the drop or the end of
//   the watch), watch_ms, states [{t, state, code?, reason?}], errors
//   [{t, type}], socket {url, offered, protocol, close_code, close_reason,
//   was_clean, messages_received, bytes_received, text_messages_received,
//   messages_sent, bytes_sent, sent_first_bytes {byte: count}},
//   canvas {width, height, colours} (the most colours seen), rendered
//   (colours > 1), rendered_ms (when the page's 50 ms sampler first saw more
//   than one colour; null if it never did while the page ran it),
//   rendered_while_connected (seen by the sampler between connected and the
//   drop, or on the canvas when the "disconnected" state came),
//   screen, version, console [page console lines].
// Exit 0 when the run was observed, whatever the connection did (the test
// judges it); 1 when the harness itself failed (the page or wmks.js did not
// load, Chromium failed); 2 on bad usage.

import { chromium } from 'playwright-core';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

function usage(msg) {
  console.error(`wmks.mjs: ${msg}`);
  console.error('usage: node wmks.mjs --page-base URL --ws-url URL --out-dir DIR --watch-ms N [--options JSON] [--chromium PATH] [--timeout-ms N]');
  process.exit(2);
}

const opts = { chromium: '/usr/lib/chromium/chromium', timeoutMs: 20000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
  if (a === '--page-base') opts.pageBase = val();
  else if (a === '--ws-url') opts.wsUrl = val();
  else if (a === '--out-dir') opts.outDir = val();
  else if (a === '--watch-ms') opts.watchMs = Number(val());
  else if (a === '--options') opts.options = val();
  else if (a === '--chromium') opts.chromium = val();
  else if (a === '--timeout-ms') opts.timeoutMs = Number(val());
  else usage(`unknown argument ${a}`);
}
if (!opts.pageBase) usage('--page-base is required');
if (!opts.wsUrl || !/^wss?:\/\//.test(opts.wsUrl)) usage('--ws-url ws://… or wss://… is required');
if (!opts.outDir) usage('--out-dir is required');
if (!(opts.watchMs >= 0)) usage('--watch-ms N (N >= 0) is required');
if (!(opts.timeoutMs > 0)) usage('--timeout-ms must be positive');
if (opts.options !== undefined) {
  try { JSON.parse(opts.options); } catch (e) { usage(`--options is not JSON: ${e.message}`); }
}
if (!existsSync(opts.chromium)) {
  usage(`Chromium not found at ${opts.chromium}: install Debian package chromium (make test does)`);
}
mkdirSync(opts.outDir, { recursive: true });

// Interval of the page polls (state, canvas).
const POLL_MS = 50;

// Whatever happens, never outlive the caller's patience.
const watchdogMs = opts.timeoutMs * 2 + opts.watchMs + 15000;
const watchdog = setTimeout(() => {
  console.error(`wmks.mjs: FAIL: gave up after ${watchdogMs} ms`);
  process.exit(1);
}, watchdogMs);
watchdog.unref();

function pageState() {
  const t = window.__wmks;
  return {
    status: t.status,
    pageError: t.pageError || null,
    now: t.t0 === null ? 0 : Math.round(performance.now() - t.t0),
    connected: t.states.find((s) => s.state === 'connected') || null,
    disconnected: t.states.find((s) => s.state === 'disconnected') || null,
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function observe(page, consoleLines) {
  const q = new URLSearchParams({ url: opts.wsUrl });
  if (opts.options !== undefined) q.set('options', opts.options);
  const pageUrl = `${opts.pageBase.replace(/\/+$/, '')}/wmks-test.html?${q}`;
  const response = await page.goto(pageUrl, { waitUntil: 'load' });
  if (!response || !response.ok()) throw new Error(`GET ${pageUrl}: HTTP ${response && response.status()}`);

  // 1. Connected, or disconnected (never connected), within the timeout.
  const deadline = Date.now() + opts.timeoutMs;
  let s;
  for (;;) {
    s = await page.evaluate(pageState);
    if (s.pageError) throw new Error(`the page failed: ${s.pageError}`);
    if (s.connected || s.disconnected || Date.now() >= deadline) break;
    await sleep(POLL_MS);
  }
  if (s.status === 'loading') throw new Error(`wmks.js never loaded; console: ${consoleLines.slice(-20).join(' | ')}`);

  // 2. The watch: until watch-ms after "connected", or the drop.
  if (s.connected) {
    const watchEnd = s.connected.t + opts.watchMs;
    while (!s.disconnected && s.now < watchEnd) {
      await sleep(POLL_MS);
      s = await page.evaluate(pageState);
    }
  }
  // The canvas as it is now, if the page's sampler never saw a picture.
  const last = await page.evaluate(() => window.__canvasColours());
  const shot = resolve(join(opts.outDir, 'wmks.png'));
  await page.screenshot({ path: shot });
  const t = await page.evaluate(() => window.__wmks);
  const socket = t.sockets[0] || null;
  const connectedMs = s.connected ? s.connected.t : null;
  const disconnectedMs = s.disconnected ? s.disconnected.t : null;
  const end = disconnectedMs ?? s.now;
  const best = last.colours > t.canvas.colours ? last : t.canvas;
  return {
    page: pageUrl, ws_url: opts.wsUrl, version: t.version || null,
    connected: connectedMs !== null, connected_ms: connectedMs, disconnected_ms: disconnectedMs,
    dropped: connectedMs !== null && disconnectedMs !== null,
    stayed_connected_ms: connectedMs === null ? 0 : Math.max(0, end - connectedMs),
    watch_ms: opts.watchMs, states: t.states, errors: t.errors, sockets: t.sockets.length, socket,
    canvas: best, rendered: best.colours > 1, rendered_ms: t.rendered_ms,
    rendered_while_connected: connectedMs !== null && (
      (t.rendered_ms !== null && (disconnectedMs === null || t.rendered_ms <= disconnectedMs)) ||
      (s.disconnected !== null && s.disconnected.canvas && s.disconnected.canvas.colours > 1)),
    screen: t.screen || null,
    screenshot: shot, console: consoleLines.slice(-40),
  };
}

let browser;
let code = 0;
try {
  browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    timeout: opts.timeoutMs,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
      // wss to a test certificate (self-signed).
      '--ignore-certificate-errors',
      '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const context = await browser.newContext({ viewport: { width: 900, height: 700 }, ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(opts.timeoutMs);
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
  page.on('requestfailed', (r) => consoleLines.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
  const result = await observe(page, consoleLines);
  writeFileSync(join(opts.outDir, 'wmks.json'), JSON.stringify(result, null, 2));
  console.log(`wmks.mjs: result ${JSON.stringify({ ...result, console: undefined })}`);
  for (const l of result.console) console.log(`  ${l}`);
} catch (e) {
  console.error(`wmks.mjs: FAIL: ${e && e.stack || e}`);
  code = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
}
process.exit(code);
