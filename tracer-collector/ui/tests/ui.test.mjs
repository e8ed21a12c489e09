#!/usr/bin/env node
// End-to-end browser test of the tracer web UI, driving Debian's Chromium through playwright-core.
//
//   node ui.test.mjs --url http://127.0.0.1:PORT --service S --operation O \
//        --expect-spans N --expect-depth D --screenshot-dir DIR
//
// Optional: --chromium PATH (default $CHROMIUM or /usr/bin/chromium), --timeout MS (per wait, default 15000),
//           --width PX --height PX (viewport, default 1440x900), --headed.
// Depth is 0-based: a root span has data-depth="0", so a root -> child -> grandchild trace has depth 2.
// Exit code 0 when every check passes, 1 (with a "FAIL: ..." line) otherwise.

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import process from 'node:process';

const USAGE = 'usage: node ui.test.mjs --url http://127.0.0.1:PORT --service S --operation O ' +
  '--expect-spans N --expect-depth D --screenshot-dir DIR [--chromium PATH] [--timeout MS] [--width PX] [--height PX] [--headed]';

class TestFailure extends Error {}
const fail = (msg) => { throw new TestFailure(msg); };

function parseArgs(argv) {
  const opts = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--help' || a === '-h') { console.log(USAGE); process.exit(0); }
    if (a === '--headed') { opts.headed = true; continue; }
    if (!a.startsWith('--')) fail(`unexpected argument "${a}"\n${USAGE}`);
    let key = a.slice(2), val;
    const eq = key.indexOf('=');
    if (eq >= 0) { val = key.slice(eq + 1); key = key.slice(0, eq); } else {
      val = argv[++i];
      if (val === undefined) fail(`missing value for --${key}\n${USAGE}`);
    }
    opts[key.replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = val;
  }
  for (const k of ['url', 'service', 'operation', 'expectSpans', 'expectDepth', 'screenshotDir']) {
    if (opts[k] === undefined || opts[k] === '') fail(`missing --${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())}\n${USAGE}`);
  }
  const int = (k) => { const n = Number(opts[k]); if (!Number.isInteger(n) || n < 0) fail(`--${k} must be a non-negative integer, got "${opts[k]}"`); return n; };
  return {
    url: opts.url.replace(/\/+$/, ''),
    service: opts.service,
    operation: opts.operation,
    expectSpans: int('expectSpans'),
    expectDepth: int('expectDepth'),
    screenshotDir: path.resolve(opts.screenshotDir),
    chromium: opts.chromium || process.env.CHROMIUM || '/usr/bin/chromium',
    timeout: opts.timeout ? Number(opts.timeout) : 15000,
    width: opts.width ? Number(opts.width) : 1440,
    height: opts.height ? Number(opts.height) : 900,
    headed: !!opts.headed,
  };
}

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

let passed = 0;
async function step(name, fn) {
  const t0 = Date.now();
  try {
    const r = await fn();
    passed++;
    console.log(`  ok  ${name} (${Date.now() - t0} ms)${r ? ` — ${r}` : ''}`);
  } catch (e) {
    const msg = e instanceof TestFailure ? e.message : (e && e.message ? e.message.split('\n')[0] : String(e));
    throw new TestFailure(`${name}: ${msg}`);
  }
}

// Waits for `okSel`; if one of the UI's state boxes (error/empty) shows up first, fails with its text.
async function waitForOrState(page, okSel, what, timeout) {
  const handle = await page.waitForFunction(([sel]) => {
    if (document.querySelector(sel)) return 'ok';
    const st = document.querySelector('.state-error, .state-empty');
    return st ? `state:${Array.from(st.querySelectorAll('.state-title, .state-detail')).map((e) => e.innerText.trim()).join(' — ')}` : false;
  }, [okSel], { timeout }).catch(() => null);
  const v = handle ? await handle.jsonValue() : null;
  if (v === null) fail(`timed out after ${timeout} ms waiting for ${what} (${okSel})`);
  if (v !== 'ok') fail(`expected ${what} but the UI shows: "${v.slice(6)}"`);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  mkdirSync(opts.screenshotDir, { recursive: true });
  let chromium;
  try { ({ chromium } = await import('playwright-core')); } catch {
    fail('cannot import playwright-core: run "npm ci" in ui/tests first');
  }
  console.log(`tracer UI test against ${opts.url} (service="${opts.service}", operation="${opts.operation}", ` +
    `expect ${opts.expectSpans} spans, depth ${opts.expectDepth})`);

  let browser;
  try {
    browser = await chromium.launch({ executablePath: opts.chromium, headless: !opts.headed, args: opts.headed ? CHROMIUM_ARGS.slice(1) : CHROMIUM_ARGS, timeout: 60000 });
  } catch (e) {
    fail(`could not launch Chromium at ${opts.chromium} (apt-get install chromium): ${e.message.split('\n')[0]}`);
  }
  const pageErrors = [];
  const T = opts.timeout;
  try {
    const context = await browser.newContext({ viewport: { width: opts.width, height: opts.height }, colorScheme: 'dark' });
    const page = await context.newPage();
    page.setDefaultTimeout(T);
    page.on('pageerror', (e) => pageErrors.push(e.message));
    const shot = async (name) => {
      const file = path.join(opts.screenshotDir, name);
      await page.screenshot({ path: file, fullPage: true });
      return file;
    };
    const noPageErrors = () => { if (pageErrors.length) fail(`uncaught error in the page: ${pageErrors[0]}`); };

    await step('search page loads', async () => {
      const res = await page.goto(`${opts.url}/#/search`, { waitUntil: 'domcontentloaded' }).catch((e) => fail(`cannot open ${opts.url}: ${e.message.split('\n')[0]}`));
      if (!res || !res.ok()) fail(`GET ${opts.url}/ answered HTTP ${res ? res.status() : '?'}`);
      await page.waitForSelector('#f-service', { timeout: T }).catch(() => fail('no search form (#f-service) rendered'));
      if (!(await page.locator('.brand', { hasText: 'tracer' }).count())) fail('top bar with product name "tracer" missing');
      noPageErrors();
    });

    await step(`select service "${opts.service}"`, async () => {
      const ok = await page.waitForFunction((s) => {
        const sel = document.querySelector('#f-service');
        if (sel && Array.from(sel.options).some((o) => o.value === s)) return 'ok';
        const err = document.querySelector('.state-error');
        return err ? 'error:' + Array.from(err.querySelectorAll('.state-title, .state-detail')).map((e) => e.innerText.trim()).join(' — ') : false;
      }, opts.service, { timeout: T }).then((h) => h.jsonValue()).catch(() => null);
      if (ok === null) {
        const have = await page.$$eval('#f-service option', (os) => os.map((o) => o.value).filter(Boolean));
        fail(`service "${opts.service}" never appeared in the service list (have: ${have.join(', ') || 'none'})`);
      }
      if (ok !== 'ok') fail(`the UI shows an error instead of services: ${ok.slice(6)}`);
      await page.selectOption('#f-service', opts.service);
    });

    await step(`select operation "${opts.operation}"`, async () => {
      const found = await page.waitForFunction((o) => {
        const sel = document.querySelector('#f-operation');
        return !!sel && !sel.disabled && Array.from(sel.options).some((x) => x.value === o);
      }, opts.operation, { timeout: T }).then(() => true).catch(() => false);
      if (!found) {
        const have = await page.$$eval('#f-operation option', (os) => os.map((o) => o.value).filter(Boolean));
        fail(`operation "${opts.operation}" not offered for ${opts.service} (have: ${have.join(', ') || 'none'})`);
      }
      await page.selectOption('#f-operation', opts.operation);
    });

    let resultCount = 0;
    await step('find traces', async () => {
      await page.click('#find-btn');
      await waitForOrState(page, '.result-list .trace-item', 'search results', T);
      resultCount = await page.locator('.result-list .trace-item').count();
      if (resultCount < 1) fail('no results');
      const hash = await page.evaluate(() => location.hash);
      if (!hash.includes(`service=${encodeURIComponent(opts.service).replace(/%20/g, '+')}`) && !hash.includes(`service=${encodeURIComponent(opts.service)}`)) {
        fail(`search state not reflected in the URL hash (${hash})`);
      }
      const dots = await page.locator('.scatter-svg circle.dot').count();
      if (dots !== resultCount) fail(`scatter plot shows ${dots} dots for ${resultCount} results`);
      noPageErrors();
      return `${resultCount} result(s), URL ${hash}`;
    });
    console.log(`  ..  screenshot ${await shot('search.png')}`);

    let traceId = '';
    let rows = [];
    await step('open the first trace', async () => {
      const first = page.locator('.result-list .trace-item').first();
      traceId = await first.getAttribute('data-trace-id');
      await first.click();
      await waitForOrState(page, '.waterfall .span-row', 'the trace waterfall', T);
      const hash = await page.evaluate(() => location.hash);
      if (!hash.startsWith(`#/trace/${traceId}`)) fail(`URL is ${hash}, expected #/trace/${traceId}`);
      const shown = (await page.textContent('#trace-id') || '').trim();
      if (shown !== traceId) fail(`header shows trace id "${shown}", expected "${traceId}"`);
      return traceId;
    });

    await step(`waterfall has ${opts.expectSpans} span rows, max depth ${opts.expectDepth}, correct nesting`, async () => {
      rows = await page.$$eval('.waterfall [data-span-id]', (els) => els.map((e) => ({
        id: e.getAttribute('data-span-id'), depth: Number(e.getAttribute('data-depth')),
        parent: e.getAttribute('data-parent-id') || '', bars: e.querySelectorAll('.span-bar').length,
        barWidth: e.querySelector('.span-bar') ? e.querySelector('.span-bar').getBoundingClientRect().width : 0,
        orphan: e.classList.contains('orphan'),
      })));
      if (rows.length !== opts.expectSpans) fail(`expected exactly ${opts.expectSpans} span rows, found ${rows.length}`);
      const maxDepth = Math.max(...rows.map((r) => r.depth));
      if (maxDepth !== opts.expectDepth) fail(`expected max data-depth ${opts.expectDepth}, found ${maxDepth}`);
      const index = new Map();
      rows.forEach((r, i) => {
        if (!r.id) fail(`row ${i} has an empty data-span-id`);
        if (index.has(r.id)) fail(`span ${r.id} appears twice`);
        if (!Number.isInteger(r.depth) || r.depth < 0) fail(`row ${r.id} has invalid data-depth`);
        if (r.bars !== 1) fail(`row ${r.id} has ${r.bars} .span-bar elements (expected 1)`);
        if (!(r.barWidth >= 1)) fail(`row ${r.id}'s bar is not visible (width ${r.barWidth}px)`);
        if (r.depth > 0) {
          if (!r.parent) fail(`row ${r.id} at depth ${r.depth} has no data-parent-id`);
          const pi = index.get(r.parent);
          if (pi === undefined) fail(`parent ${r.parent} of span ${r.id} is not shown above it`);
          if (rows[pi].depth !== r.depth - 1) fail(`span ${r.id} (depth ${r.depth}) sits under ${r.parent} of depth ${rows[pi].depth}`);
        }
        index.set(r.id, i);
      });
      const api = await page.evaluate(async (id) => {
        const r = await fetch(`api/traces/${id}`);
        return r.ok ? (await r.json()).data[0] : null;
      }, traceId);
      if (api && api.spans.length !== rows.length) fail(`API has ${api.spans.length} spans for this trace but the waterfall shows ${rows.length}`);
      const ticks = await page.locator('.wf-axis .axis-tick').count();
      if (ticks < 2) fail(`time axis has ${ticks} tick labels`);
      return `${rows.length} rows, depths [${rows.map((r) => r.depth).join(',')}], ${ticks} axis ticks`;
    });

    await step('clicking a span opens its detail panel with attributes', async () => {
      const trace = await page.evaluate(async (id) => (await (await fetch(`api/traces/${id}`)).json()).data[0], traceId);
      const bySpan = new Map(trace.spans.map((s) => [s.spanID, s]));
      // prefer a nested span with attributes; fall back to any span with attributes
      const pick = rows.find((r) => r.depth > 0 && (bySpan.get(r.id)?.tags || []).length) ||
        rows.find((r) => (bySpan.get(r.id)?.tags || []).length) || rows[0];
      const span = bySpan.get(pick.id);
      await page.click(`.span-row[data-span-id="${pick.id}"] .sr-op`);
      const panel = page.locator(`.span-detail[data-detail-for="${pick.id}"]`);
      await panel.waitFor({ state: 'visible', timeout: T }).catch(() => fail(`no detail panel appeared for span ${pick.id}`));
      const text = await panel.innerText();
      if (!text.includes(pick.id)) fail('detail panel does not show the span id');
      const keys = await panel.locator('.sd-tags .kv-key').allInnerTexts();
      const vals = await panel.locator('.sd-tags .kv-val').allInnerTexts();
      const want = span.tags || [];
      if (keys.length !== want.length) fail(`detail panel lists ${keys.length} attributes, span has ${want.length}`);
      for (const t of want) {
        const i = keys.indexOf(t.key);
        if (i < 0) fail(`attribute "${t.key}" missing from the detail panel`);
        if (!vals[i].replace(/\s+/g, '').includes(String(t.value).replace(/\s+/g, ''))) fail(`attribute "${t.key}" shows "${vals[i]}", expected "${t.value}"`);
      }
      const procKeys = await panel.locator('.sd-process .kv-key').allInnerTexts();
      const proc = trace.processes[span.processID];
      for (const t of (proc && proc.tags) || []) if (!procKeys.includes(t.key)) fail(`process tag "${t.key}" missing from the detail panel`);
      const hash = await page.evaluate(() => location.hash);
      if (!hash.includes(`span=${pick.id}`)) fail(`selected span not reflected in URL (${hash})`);
      noPageErrors();
      return `span ${pick.id} "${span.operationName}": ${keys.length} attributes, ${procKeys.length} process tags`;
    });
    console.log(`  ..  screenshot ${await shot('trace.png')}`);

    await step('service map renders', async () => {
      await page.click('.nav a[data-nav="map"]');
      await waitForOrState(page, '#service-map svg .map-node', 'service map nodes', T);
      const nodes = await page.locator('#service-map svg .map-node').count();
      const edges = await page.locator('#service-map svg path.edge').count();
      if (nodes < 1) fail('service map has no nodes');
      const services = await page.$$eval('#service-map svg .map-node', (ns) => ns.map((n) => n.getAttribute('data-service')));
      if (!services.includes(opts.service)) fail(`service "${opts.service}" is not on the map (has ${services.join(', ')})`);
      noPageErrors();
      return `${nodes} nodes, ${edges} edges`;
    });
    console.log(`  ..  screenshot ${await shot('map.png')}`);

    await step('clicking a map node opens a search for that service', async () => {
      await page.click(`#service-map svg .map-node[data-service="${opts.service}"]`);
      await page.waitForFunction(() => location.hash.startsWith('#/search'), null, { timeout: T });
      await waitForOrState(page, '.result-list .trace-item', 'search results for the clicked service', T);
      const v = await page.inputValue('#f-service');
      if (v !== opts.service) fail(`service field is "${v}" after clicking the map node`);
      noPageErrors();
    });
  } finally {
    await browser.close().catch(() => {});
  }
}

const started = Date.now();
main().then(() => {
  console.log(`PASS: ${passed} checks in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`${passed} passed, 0 failed`);
  process.exit(0);
}, (e) => {
  console.error(`FAIL: ${e instanceof TestFailure ? e.message : (e && e.stack) || e}`);
  console.log(`${passed} passed, 1 failed`);
  process.exit(1);
});
