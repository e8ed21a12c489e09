#!/usr/bin/env node
// End-to-end browser test of the tracer web UI, driving Debian's Chromium through playwright-core.
//
//   node ui.test.mjs --url http://127.0.0.1:PORT --service S --operation O \
//        --expect-spans N --expect-depth D --screenshot-dir DIR
//
// Optional: --chromium PATH (default $CHROMIUM or /usr/bin/chromium), --timeout MS (per wait, default 15000),
//           --width PX --height PX (viewport, default 1440x900), --headed.
// Link provenance, hosts, clock corrections, incomplete traces (all optional, checked against the API's JSON):
//   --provenance-trace ID --expect-links N --expect-low N --expect-medium N --min-shifted N --expect-hosts N
//   --expect-incomplete yes|no|auto   (auto: whatever the API says, and says which it was)
// Depth is 0-based: a root span has data-depth="0", so a root -> child -> grandchild trace has depth 2.
// Exit code 0 when every check passes, 1 (with a "FAIL: ..." line) otherwise.

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import process from 'node:process';

const USAGE = 'usage: node ui.test.mjs --url http://127.0.0.1:PORT --service S --operation O ' +
  '--expect-spans N --expect-depth D --screenshot-dir DIR [--chromium PATH] [--timeout MS] [--width PX] [--height PX] [--headed] ' +
  '[--provenance-trace ID --expect-links N --expect-low N --expect-medium N --min-shifted N --expect-hosts N --expect-incomplete yes|no|auto]';

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
  let provenance = null;
  if (opts.provenanceTrace !== undefined) {
    for (const k of ['expectLinks', 'expectLow', 'expectMedium', 'minShifted', 'expectHosts']) {
      if (opts[k] === undefined) fail(`--provenance-trace needs --${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())}`);
    }
    const inc = opts.expectIncomplete || 'auto';
    if (!['yes', 'no', 'auto'].includes(inc)) fail(`--expect-incomplete must be yes, no or auto, got "${inc}"`);
    provenance = { trace: opts.provenanceTrace, links: int('expectLinks'), low: int('expectLow'), medium: int('expectMedium'),
      minShifted: int('minShifted'), hosts: int('expectHosts'), incomplete: inc };
  }
  return {
    provenance,
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
    if (opts.provenance) await provenanceChecks(page, opts, shot, noPageErrors);
  } finally {
    await browser.close().catch(() => {});
  }
}

// What the UI must say about each span's parent link, in words (a fragment of the detail panel's text).
const LINK_WORDS = {
  'tcp-seq': 'parent found by TCP sequence', 'tcp-seq-nat': 'TCP sequence number, method and path', thread: 'same thread',
  'forwarded-request': 'forwarded request line', 'sole-request': 'only request in flight', 'shared-id': 'shared id', traceparent: 'traceparent header',
  b3: 'B3 header', 'forwarded-header': 'forwarded header',
};
const RANK = { low: 1, medium: 2, high: 3 };
const firstTag = (tags, key) => { const t = (tags || []).find((x) => x.key === key); return t ? t.value : undefined; };

// The rows of the waterfall as the test reads them.
// textContent, not innerText: rows are `content-visibility: auto`, and the text of a row the
// browser skipped as off-screen reads as empty through innerText (it failed that way in CI).
const readRows = (page) => page.$$eval('.waterfall .span-row', (els) => els.map((e) => {
  const b = e.querySelector('.link-badge');
  const c = e.querySelector('.clock-badge');
  const h = e.querySelector('.sr-host');
  return { id: e.dataset.spanId, depth: Number(e.dataset.depth), parent: e.dataset.parentId || '', detached: e.classList.contains('detached'),
    badge: b ? { source: b.dataset.source, confidence: b.dataset.confidence, by: b.dataset.by, text: b.textContent } : null,
    shift: c ? Number(c.dataset.shiftUs) : null, host: h ? h.textContent.trim() : null };
}));

async function provenanceChecks(page, opts, shot, noPageErrors) {
  const P = opts.provenance, T = opts.timeout;
  let api = null;
  await step(`provenance trace ${P.trace}: API has the posted links, shifts and hosts`, async () => {
    api = await page.evaluate(async (id) => { const r = await fetch(`api/traces/${id}`); return r.ok ? (await r.json()).data[0] : null; }, P.trace);
    if (!api) fail(`GET api/traces/${P.trace} failed`);
    const links = api.spans.filter((s) => firstTag(s.tags, 'tracer.link.source') != null);
    const conf = (c) => links.filter((s) => firstTag(s.tags, 'tracer.link.confidence') === c).length;
    const shifted = api.spans.filter((s) => firstTag(s.tags, 'tracer.clock.shift_us') != null);
    const hosts = new Set(Object.values(api.processes).map((p) => firstTag(p.tags, 'host.name')).filter(Boolean));
    const got = { links: links.length, low: conf('low'), medium: conf('medium'), hosts: hosts.size };
    for (const k of Object.keys(got)) if (got[k] !== P[k]) fail(`expected ${P[k]} ${k}, the API's JSON has ${got[k]}`);
    // How many spans a correction moves depends on the collector's estimate; at least this many.
    P.shifted = shifted.length;
    if (P.shifted < P.minShifted) fail(`expected at least ${P.minShifted} clock-shifted spans, the API's JSON has ${P.shifted}`);
    if (P.incomplete === 'yes' && api.incomplete !== true) fail(`expected the API to mark the trace incomplete, it has incomplete=${api.incomplete}`);
    if (P.incomplete === 'no' && api.incomplete === true) fail('the API marks the trace incomplete, expected it complete');
    const by = links.map((s) => firstTag(s.tags, 'tracer.link.by') || 'agent');
    return `${got.links} links (${got.low} low, ${got.medium} medium; ${by.filter((b) => b === 'collector').length} by the collector), ` +
      `${P.shifted} shifted, ${got.hosts} hosts, incomplete=${api.incomplete}`;
  });
  const bySpan = new Map(api.spans.map((s) => [s.spanID, s]));
  const hostOf = (s) => firstTag((api.processes[s.processID] || {}).tags, 'host.name');
  const ids = new Set(api.spans.map((s) => s.spanID));
  const parentOf = (s) => { const r = (s.references || []).find((x) => x.refType === 'CHILD_OF'); return r && ids.has(r.spanID) ? r.spanID : ''; };
  const rankOf = (s) => RANK[firstTag(s.tags, 'tracer.link.confidence')] || 0;

  await step('trace page: a provenance badge on every linked span, the host on every row', async () => {
    await page.goto(`${opts.url}/#/trace/${P.trace}`, { waitUntil: 'domcontentloaded' });
    await waitForOrState(page, '.waterfall .span-row', 'the provenance trace', T);
    const rows = await readRows(page);
    if (rows.length !== api.spans.length) fail(`${rows.length} rows for ${api.spans.length} spans`);
    let badges = 0;
    for (const r of rows) {
      const s = bySpan.get(r.id);
      const source = firstTag(s.tags, 'tracer.link.source');
      if (source == null) { if (r.badge) fail(`span ${r.id} has no provenance but shows a badge "${r.badge.text}"`); } else {
        if (!r.badge) fail(`span ${r.id} (${s.operationName}) has tracer.link.source=${source} but no .link-badge`);
        const want = { source, confidence: firstTag(s.tags, 'tracer.link.confidence'), by: firstTag(s.tags, 'tracer.link.by') || 'agent' };
        for (const k of ['source', 'confidence', 'by']) if (r.badge[k] !== want[k]) fail(`span ${r.id}'s badge has ${k}="${r.badge[k]}", expected "${want[k]}"`);
        if (!r.badge.text.includes(source) || !r.badge.text.includes(want.confidence)) fail(`span ${r.id}'s badge reads "${r.badge.text}"`);
        if ((want.by === 'collector') !== r.badge.text.includes('collector')) fail(`span ${r.id}'s badge "${r.badge.text}" does not say whether the collector made it (by=${want.by})`);
        badges++;
      }
      if (P.hosts > 1 && r.host !== hostOf(s)) fail(`row ${r.id} shows host "${r.host}", its resource has host.name "${hostOf(s)}"`);
      if (r.parent !== parentOf(s)) fail(`row ${r.id} has data-parent-id "${r.parent}" with all links shown, expected "${parentOf(s)}"`);
    }
    if (badges !== P.links) fail(`${badges} badges, expected ${P.links}`);
    const hostChips = await page.locator('#trace-hosts .host-chip').count();
    if (hostChips !== P.hosts) fail(`header lists ${hostChips} hosts, expected ${P.hosts}`);
    noPageErrors();
    return `${badges} badges, e.g. "${rows.find((r) => r.badge).badge.text.replace(/\s+/g, ' ')}"`;
  });

  await step('detail panel says in words how each parent link was made', async () => {
    const linked = api.spans.filter((s) => firstTag(s.tags, 'tracer.link.source') != null);
    for (const s of linked) {
      await page.click(`.span-row[data-span-id="${s.spanID}"] .sr-op`);
      const panel = page.locator(`.span-detail[data-detail-for="${s.spanID}"]`);
      await panel.waitFor({ state: 'visible', timeout: T }).catch(() => fail(`no detail panel for span ${s.spanID}`));
      const text = (await panel.locator('.sd-prov').innerText().catch(() => '')).replace(/\s+/g, ' ');
      const source = firstTag(s.tags, 'tracer.link.source');
      const words = LINK_WORDS[source];
      if (words && !text.toLowerCase().includes(words.toLowerCase())) fail(`span ${s.spanID} (${source}): detail panel does not say "${words}": "${text.slice(0, 200)}"`);
      const conf = firstTag(s.tags, 'tracer.link.confidence');
      if (!text.includes(conf)) fail(`span ${s.spanID}: detail panel does not give the confidence "${conf}"`);
      for (const w of s.warnings || []) if (!text.includes(w.replace(/\s+/g, ' '))) fail(`span ${s.spanID}: warning "${w}" is not in the details`);
      const replaced = firstTag(s.tags, 'tracer.link.replaced');
      if (replaced && !text.includes(replaced)) fail(`span ${s.spanID}: the replaced parent "${replaced}" is not shown`);
      const shift = firstTag(s.tags, 'tracer.clock.shift_us');
      if (shift != null) {
        if (!text.includes(`${Number(shift) >= 0 ? '+' : ''}${shift} µs`)) fail(`span ${s.spanID}: the shift ${shift} µs is not in the details: "${text.slice(0, 300)}"`);
        const raw = await panel.locator('.raw-start').getAttribute('title').catch(() => null);
        if (!raw || !raw.startsWith(String(firstTag(s.tags, 'tracer.clock.raw_start_us')))) fail(`span ${s.spanID}: raw start missing or wrong (${raw})`);
      }
      await page.click(`.span-row[data-span-id="${s.spanID}"] .sr-op`);
      await panel.waitFor({ state: 'detached', timeout: T });
    }
    noPageErrors();
    return `${linked.length} panels`;
  });
  const withShift = api.spans.find((s) => firstTag(s.tags, 'tracer.clock.shift_us') != null && firstTag(s.tags, 'tracer.link.source') != null);
  if (withShift) {
    await page.click(`.span-row[data-span-id="${withShift.spanID}"] .sr-op`);
    await page.locator(`.span-detail[data-detail-for="${withShift.spanID}"]`).waitFor({ state: 'visible', timeout: T });
    console.log(`  ..  screenshot ${await shot('provenance-detail.png')}`);
    await page.click(`.span-row[data-span-id="${withShift.spanID}"] .sr-op`);
  }

  await step('clock correction: a marker on each shifted span and a note on the trace', async () => {
    const rows = await readRows(page);
    const shifted = api.spans.filter((s) => firstTag(s.tags, 'tracer.clock.shift_us') != null);
    for (const s of shifted) {
      const r = rows.find((x) => x.id === s.spanID);
      if (r.shift !== Number(firstTag(s.tags, 'tracer.clock.shift_us'))) fail(`span ${s.spanID}: clock marker shows shift ${r.shift}, expected ${firstTag(s.tags, 'tracer.clock.shift_us')}`);
    }
    const marked = rows.filter((r) => r.shift != null).length;
    if (marked !== shifted.length) fail(`${marked} rows have a clock marker, ${shifted.length} spans were shifted`);
    const note = P.shifted ? (await page.locator('.clock-note').innerText().catch(() => '')) : '';
    if (P.shifted) {
      if (!note.includes(`applied to ${P.shifted} span`)) fail(`trace note does not say "applied to ${P.shifted} spans": "${note}"`);
      for (const s of shifted) if (!note.includes(hostOf(s))) fail(`trace note does not name host ${hostOf(s)}: "${note}"`);
    } else if (await page.locator('.clock-note').count()) fail('a clock note is shown on a trace without shifted spans');
    return note.split('.')[0];
  });
  console.log(`  ..  screenshot ${await shot('provenance.png')}`);

  for (const [level, label, hidden] of [['medium', 'medium+', P.low], ['high', 'high only', P.low + P.medium], ['all', 'all', 0]]) {
    await step(`link filter "${label}": links below it become detached roots (${hidden} hidden)`, async () => {
      await page.selectOption('#link-threshold', level);
      await page.waitForFunction(([n]) => document.querySelectorAll('.waterfall .span-row.detached').length === n, [hidden], { timeout: T })
        .catch(() => null);
      const rows = await readRows(page);
      if (rows.length !== api.spans.length) fail(`${rows.length} rows for ${api.spans.length} spans`);
      const min = RANK[level] || 0;
      const depth = new Map(rows.map((r) => [r.id, r.depth]));
      let detached = 0;
      for (const r of rows) {
        const s = bySpan.get(r.id);
        const cut = rankOf(s) > 0 && rankOf(s) < min && parentOf(s);
        if (cut) {
          detached++;
          if (r.depth !== 0 || r.parent !== '' || !r.detached) fail(`span ${r.id} (${firstTag(s.tags, 'tracer.link.confidence')}) should be a detached root, has depth ${r.depth}, parent "${r.parent}"`);
          if (!r.badge || !/hidden/.test(r.badge.text)) fail(`detached span ${r.id} does not say its link is hidden`);
        } else {
          if (r.detached) fail(`span ${r.id} is detached at threshold ${level}`);
          if (r.parent !== parentOf(s)) fail(`span ${r.id} has parent "${r.parent}", expected "${parentOf(s)}"`);
          if (r.parent && r.depth !== depth.get(r.parent) + 1) fail(`span ${r.id} sits at depth ${r.depth} under a parent at ${depth.get(r.parent)}`);
        }
      }
      if (detached !== hidden) fail(`${detached} spans detached, expected ${hidden}`);
      const note = await page.locator('.links-note').count();
      if ((hidden > 0) !== (note > 0)) fail(`the "links hidden" note is ${note ? 'shown' : 'missing'} with ${hidden} hidden`);
      noPageErrors();
      return `depths [${rows.map((r) => r.depth).join(',')}]`;
    });
    if (level === 'medium') console.log(`  ..  screenshot ${await shot('provenance-medium.png')}`);
  }

  await step(`incomplete: banner on the trace page and marker in the search results (API: incomplete=${api.incomplete})`, async () => {
    const reasons = api.incompleteReasons || [];
    const banner = page.locator('.incomplete-banner');
    if (api.incomplete === true) {
      await banner.waitFor({ state: 'visible', timeout: T }).catch(() => fail('the API marks the trace incomplete but no .incomplete-banner is shown'));
      const items = await banner.locator('li').allInnerTexts();
      for (const r of reasons) if (!items.includes(r)) fail(`reason "${r}" missing from the banner (has ${JSON.stringify(items)})`);
      if (items.length !== reasons.length) fail(`banner lists ${items.length} reasons, the API ${reasons.length}`);
    } else if (await banner.count()) fail('an incomplete banner on a trace the API does not mark incomplete');
    const root = api.spans.find((s) => !parentOf(s));
    const svc = api.processes[root.processID].serviceName;
    await page.goto(`${opts.url}/#/search?service=${encodeURIComponent(svc)}&lookback=1h&limit=20`, { waitUntil: 'domcontentloaded' });
    await waitForOrState(page, `.result-list .trace-item[data-trace-id="${P.trace}"]`, 'the provenance trace in the results', T);
    const mark = await page.locator(`.trace-item[data-trace-id="${P.trace}"] .incomplete-mark`).count();
    if ((api.incomplete === true) !== (mark === 1)) fail(`search result ${mark ? 'has' : 'lacks'} the incomplete marker with incomplete=${api.incomplete}`);
    noPageErrors();
    return api.incomplete === true ? `${reasons.length} reason(s) shown` : 'the collector does not mark this trace incomplete: checked that nothing claims it is';
  });

  // The same page in the light theme, for a look at the badges' contrast.
  await page.goto(`${opts.url}/#/trace/${P.trace}`, { waitUntil: 'domcontentloaded' });
  await waitForOrState(page, '.waterfall .span-row', 'the provenance trace', T);
  await page.evaluate(() => { document.documentElement.dataset.theme = 'light'; });
  console.log(`  ..  screenshot ${await shot('provenance-light.png')}`);
  await page.evaluate(() => { delete document.documentElement.dataset.theme; });
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
