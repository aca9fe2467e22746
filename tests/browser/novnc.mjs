#!/usr/bin/env node
// Drives real noVNC in Debian's headless Chromium through consolegate (or any
// websockify-compatible proxy that serves /usr/share/novnc with --web) and
// checks that the VNC server's picture actually shows up, pixel for pixel.
//
//   node tests/browser/novnc.mjs --base http(s)://127.0.0.1:PORT --out-dir DIR
//        --runs app,none,binary,viewer --expect RUN=FILE ...
//        [--chromium /usr/lib/chromium/chromium] [--timeout-ms 30000]
//        [--ws-path RUN=PATH ...] [--viewer-url URL]
//
// Runs (each in a fresh page of one browser):
//   app     noVNC's own app, vnc.html?autoconnect=true (no Sec-WebSocket-Protocol)
//   none    rfb-test.html: core/rfb.js with noVNC's default (no subprotocol)
//   binary  rfb-test.html with wsProtocols: ['binary']
//   viewer  the page at --viewer-url as it is (an appliance session's
//           `viewer_url`: noVNC's app, scaled to the window)
// With an https base the pages load over TLS and the WebSockets are wss
// (the test certificate is self-signed: Chromium ignores certificate errors).
// rfb-test.html is written into a document the proxy served (a 404 for a path
// that is no file), so the page has the proxy's origin and every module it
// imports (core/rfb.js and what that imports) comes from the proxy's --web
// directory.
//
// --ws-path RUN=PATH (repeatable) makes run RUN open its WebSocket at
// ws://HOST:PORT/PATH instead of /websockify; PATH may carry a query, e.g.
// `proxy/<session_id>?token=<ticket>` for a consolegate appliance session
// (each appliance ticket opens one connection, hence one path per run).
//
// --expect RUN=FILE (one per run, required): JSON {width, height, tolerance,
// max_mismatches, points: [[x, y, r, g, b], ...]}, the framebuffer the server
// sends, sampled (the test computes it: a picture it drew, or the appliance's
// demo pattern).
//
// For each run: wait (bounded) for the RFB connection, check the negotiated
// subprotocol, wait until the noVNC canvas has the framebuffer's size and
// shows the expected colours at the sampled points (within the tolerance;
// at most max_mismatches points may differ), then save for the test to check
// in full: DIR/canvas-<run>.png (the canvas itself, at framebuffer size),
// DIR/novnc-<run>.png (a screenshot of the page) and DIR/<run>.json (the
// canvas's place on the page, the WebSocket's URL and subprotocol).
// Exits 0 when every run passed; otherwise prints why (with the page's console)
// and exits 1. Exit 2: bad usage or environment.

import { chromium } from 'playwright-core';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

function usage(msg) {
  console.error(`novnc.mjs: ${msg}`);
  console.error('usage: node novnc.mjs --base http://127.0.0.1:PORT --out-dir DIR [--runs app,none,binary] [--chromium PATH] [--timeout-ms N] [--ws-path RUN=PATH ...]');
  process.exit(2);
}

const RUN_KINDS = ['app', 'none', 'binary', 'viewer'];
const opts = { chromium: '/usr/lib/chromium/chromium', timeoutMs: 30000, wsPaths: {}, expect: {} };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
  if (a === '--base') opts.base = val();
  else if (a === '--out-dir') opts.outDir = val();
  else if (a === '--runs') opts.runs = val();
  else if (a === '--chromium') opts.chromium = val();
  else if (a === '--timeout-ms') opts.timeoutMs = Number(val());
  else if (a === '--viewer-url') opts.viewerUrl = val();
  else if (a === '--ws-path' || a === '--expect') {
    const v = val();
    const eq = v.indexOf('=');
    if (eq <= 0) usage(`${a} wants RUN=VALUE, got ${v}`);
    if (a === '--ws-path') opts.wsPaths[v.slice(0, eq)] = v.slice(eq + 1).replace(/^\/+/, '');
    else opts.expect[v.slice(0, eq)] = JSON.parse(readFileSync(v.slice(eq + 1), 'utf8'));
  }
  else usage(`unknown argument ${a}`);
}
if (!opts.base) usage('--base is required');
if (!opts.outDir) usage('--out-dir is required');
if (!opts.runs) usage('--runs is required');
if (!existsSync(opts.chromium)) {
  usage(`Chromium not found at ${opts.chromium}: install Debian package chromium (make test does)`);
}
const base = new URL(opts.base);
const runs = opts.runs.split(',').filter(Boolean);
for (const r of runs) if (!RUN_KINDS.includes(r)) usage(`unknown run ${r}`);
for (const r of Object.keys(opts.wsPaths)) if (!runs.includes(r)) usage(`--ws-path for run ${r}, which is not in --runs`);
// No run without a picture to compare: a check that cannot fail is no check.
for (const r of runs) if (!opts.expect[r]) usage(`run ${r} has no --expect ${r}=FILE`);
if (runs.includes('viewer') !== !!opts.viewerUrl) usage('--viewer-url goes with (and only with) the viewer run');
mkdirSync(opts.outDir, { recursive: true });
const testPage = readFileSync(join(here, 'rfb-test.html'), 'utf8');
const testPagePath = '/__consolegate_rfb_test.html';

// Whatever happens, never outlive the caller's patience.
const watchdogMs = opts.timeoutMs * (runs.length + 1) + 15000;
const watchdog = setTimeout(() => {
  console.error(`novnc.mjs: FAIL: gave up after ${watchdogMs} ms`);
  process.exit(1);
}, watchdogMs);
watchdog.unref();

// Records every WebSocket the page opens: offered and negotiated subprotocol.
// A wrapper that returns the native object (not a subclass: noVNC's Websock
// checks the channel's prototype for its properties).
function recordWebSockets() {
  const Native = window.WebSocket;
  window.__sockets = [];
  function RecordedWebSocket(url, protocols) {
    const ws = protocols === undefined ? new Native(url) : new Native(url, protocols);
    const rec = {
      url: String(url),
      offered: protocols === undefined ? [] : [].concat(protocols),
      protocol: null,
      opened: false,
      closeCode: null,
    };
    window.__sockets.push(rec);
    ws.addEventListener('open', () => { rec.opened = true; rec.protocol = ws.protocol; });
    ws.addEventListener('close', (e) => { rec.closeCode = e.code; });
    return ws;
  }
  RecordedWebSocket.prototype = Native.prototype;
  for (const k of ['CONNECTING', 'OPEN', 'CLOSING', 'CLOSED']) RecordedWebSocket[k] = Native[k];
  window.WebSocket = RecordedWebSocket;
}

// The noVNC canvas against the expected framebuffer: its size, and the
// sampled points that differ by more than the tolerance in any channel.
function canvasCheck([selector, want]) {
  const canvas = document.querySelector(selector);
  if (!canvas || !canvas.width || !canvas.height) {
    return { found: !!canvas, width: 0, height: 0, mismatches: want.points.length, first: [] };
  }
  const out = { found: true, width: canvas.width, height: canvas.height, mismatches: 0, first: [] };
  if (canvas.width !== want.width || canvas.height !== want.height) {
    out.mismatches = want.points.length;
    return out;
  }
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  for (const [x, y, r, g, b] of want.points) {
    const i = (y * canvas.width + x) * 4;
    const got = [data[i], data[i + 1], data[i + 2]];
    if (Math.abs(got[0] - r) > want.tolerance || Math.abs(got[1] - g) > want.tolerance ||
        Math.abs(got[2] - b) > want.tolerance) {
      out.mismatches += 1;
      if (out.first.length < 8) out.first.push({ x, y, got, want: [r, g, b] });
    }
  }
  return out;
}

// The canvas as a PNG at its own size, and its place on the page.
function canvasDump(selector) {
  const canvas = document.querySelector(selector);
  const r = canvas.getBoundingClientRect();
  return {
    png: canvas.toDataURL('image/png'),
    rect: { x: r.x, y: r.y, width: r.width, height: r.height },
    devicePixelRatio: window.devicePixelRatio,
  };
}

async function poll(fn, timeoutMs, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await fn();
    if (last.done) return last;
    if (Date.now() >= deadline) return { ...last, timedOut: true };
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

async function runOne(browser, run) {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 }, ignoreHTTPSErrors: true });
  const logs = [];
  try {
    await context.addInitScript(recordWebSockets);
    const page = await context.newPage();
    page.setDefaultTimeout(opts.timeoutMs);
    page.on('console', (m) => logs.push(`console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
    page.on('requestfailed', (r) => logs.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
    page.on('response', (r) => { if (r.status() >= 400) logs.push(`http ${r.status()}: ${r.url()}`); });

    const wsPath = opts.wsPaths[run] ?? 'websockify';
    let url;
    let canvasSelector;
    let wantProtocol;
    if (run === 'viewer') {
      url = opts.viewerUrl;
      canvasSelector = '#noVNC_container canvas';
      wantProtocol = '';
    } else if (run === 'app') {
      const q = new URLSearchParams({
        autoconnect: 'true', host: base.hostname, port: base.port, path: wsPath,
        resize: 'off', reconnect: 'false', encrypt: base.protocol === 'https:' ? 'true' : 'false',
      });
      url = new URL(`/vnc.html?${q}`, base).href;
      canvasSelector = '#noVNC_container canvas';
      wantProtocol = '';
    } else {
      const q = new URLSearchParams({ path: wsPath });
      if (run === 'binary') q.set('protocols', 'binary');
      url = new URL(`${testPagePath}?${q}`, base).href;
      canvasSelector = '#screen canvas';
      wantProtocol = run === 'binary' ? 'binary' : '';
    }

    const response = await page.goto(url, { waitUntil: 'load' });
    const isApp = run === 'app' || run === 'viewer';
    if (isApp) {
      if (!response || !response.ok()) throw new Error(`GET ${url}: HTTP ${response && response.status()}`);
    } else {
      // The test page is no file of the web root: the proxy answers this URL
      // with an error document, which gives the page the proxy's origin (a
      // real network response, as Chromium's local-network checks want);
      // setContent then writes rfb-test.html into it, keeping that URL.
      if (!response) throw new Error(`GET ${url}: no response`);
      await page.setContent(testPage, { waitUntil: 'load' });
      const at = page.url();
      if (at !== url) throw new Error(`test page landed at ${at}, not ${url}`);
    }

    // 1. Connected (RFB handshake done: noVNC fires `connect` after ServerInit).
    const connected = await poll(async () => {
      const s = await page.evaluate((isApp) => {
        if (isApp) {
          const status = document.getElementById('noVNC_status');
          return {
            connected: document.documentElement.classList.contains('noVNC_connected'),
            status: status ? status.textContent : '',
            failed: document.documentElement.classList.contains('noVNC_disconnected') &&
              !!(status && /fail|error|disconnect/i.test(status.textContent)),
          };
        }
        const t = window.__test || { status: 'no __test', events: [] };
        return {
          connected: t.status === 'connected',
          status: t.events.join(' | '),
          failed: ['error', 'disconnected', 'securityfailure', 'credentialsrequired'].includes(t.status),
        };
      }, isApp);
      return { ...s, done: s.connected || s.failed };
    }, opts.timeoutMs);
    if (!connected.connected) {
      throw new Error(`not connected${connected.timedOut ? ` within ${opts.timeoutMs} ms` : ''}; status: ${connected.status}`);
    }

    // 2. The WebSocket went to the proxy with the expected subprotocol.
    const sockets = await page.evaluate(() => window.__sockets);
    const ws = sockets.find((s) => s.opened);
    if (!ws) throw new Error(`no open WebSocket recorded: ${JSON.stringify(sockets)}`);
    if (ws.protocol !== wantProtocol) {
      throw new Error(`negotiated subprotocol ${JSON.stringify(ws.protocol)}, want ${JSON.stringify(wantProtocol)} (offered ${JSON.stringify(ws.offered)})`);
    }

    // 3. The server's picture is drawn: the canvas has the framebuffer's
    // size and the expected colours at the sampled points.
    const want = opts.expect[run];
    const drawn = await poll(async () => {
      const s = await page.evaluate(canvasCheck, [canvasSelector, want]);
      return { ...s, done: s.width === want.width && s.height === want.height && s.mismatches <= want.max_mismatches };
    }, opts.timeoutMs, 200);
    if (!drawn.done) {
      throw new Error(`canvas ${canvasSelector} is not the server's picture: ${drawn.width}x${drawn.height} ` +
        `(want ${want.width}x${want.height}), ${drawn.mismatches} of ${want.points.length} sampled points differ ` +
        `(at most ${want.max_mismatches}); first: ${JSON.stringify(drawn.first)}`);
    }

    // noVNC's app shows a status banner ("Connected") over the top of the
    // page for a moment: the screenshot waits until it has gone.
    if (isApp) {
      const banner = await poll(async () => {
        const v = await page.evaluate(() => {
          const el = document.getElementById('noVNC_status');
          return el ? getComputedStyle(el).visibility : 'hidden';
        });
        return { visibility: v, done: v === 'hidden' };
      }, opts.timeoutMs, 100);
      if (!banner.done) throw new Error(`noVNC's status banner never went away (${banner.visibility})`);
    }

    // 4. Keep the evidence for the test's full comparison.
    const dump = await page.evaluate(canvasDump, canvasSelector);
    const canvasPng = resolve(join(opts.outDir, `canvas-${run}.png`));
    writeFileSync(canvasPng, Buffer.from(dump.png.replace(/^data:image\/png;base64,/, ''), 'base64'));
    const shot = resolve(join(opts.outDir, `novnc-${run}.png`));
    await page.screenshot({ path: shot });
    const size = statSync(shot).size;
    writeFileSync(join(opts.outDir, `${run}.json`), JSON.stringify({
      run, protocol: ws.protocol, ws: ws.url, page: page.url(),
      canvas: { width: drawn.width, height: drawn.height },
      rect: dump.rect, devicePixelRatio: dump.devicePixelRatio,
    }, null, 2));

    await page.evaluate(() => { if (window.__rfb) window.__rfb.disconnect(); });
    console.log(`novnc.mjs: ok run=${run} protocol=${JSON.stringify(ws.protocol)} ws=${ws.url} ` +
      `canvas=${drawn.width}x${drawn.height} sampled=${want.points.length} differing=${drawn.mismatches} ` +
      `screenshot=${shot} (${size} bytes)`);
    return true;
  } catch (e) {
    console.error(`novnc.mjs: FAIL run=${run}: ${e && e.message || e}`);
    for (const l of logs.slice(-60)) console.error(`  ${l}`);
    return false;
  } finally {
    await context.close().catch(() => {});
  }
}

let browser;
let ok = true;
try {
  browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    timeout: opts.timeoutMs,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
      // The test's TLS certificate is self-signed; this covers wss too.
      '--ignore-certificate-errors',
      '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  for (const run of runs) {
    ok = (await runOne(browser, run)) && ok;
  }
} catch (e) {
  console.error(`novnc.mjs: FAIL: ${e && e.stack || e}`);
  ok = false;
} finally {
  if (browser) await browser.close().catch(() => {});
}
console.log(`novnc.mjs: ${ok ? 'all runs passed' : 'FAILED'}`);
process.exit(ok ? 0 : 1);
