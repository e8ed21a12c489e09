// tracer web UI: a dependency-free single-page app over the Jaeger HTTP query API.
// Routes: #/search?…  #/trace/<id>[?span=<spanId>]  #/map?lookback=…
// Loaded as a classic deferred script (works whatever MIME type it is served with).
'use strict';
(() => {

// ───────────────────────────── DOM helpers ─────────────────────────────
const SVG_NS = 'http://www.w3.org/2000/svg';
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function build(node, props, kids) {
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (v == null || v === false) continue;
      if (k === 'style') { for (const [sk, sv] of Object.entries(v)) if (sv != null) node.style.setProperty(sk, String(sv)); }
      else if (k === 'dataset') { for (const [dk, dv] of Object.entries(v)) if (dv != null) node.dataset[dk] = String(dv); }
      else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
      else if (k === 'text') node.textContent = v;
      else if (k === 'value' && 'value' in node && node.tagName !== 'OPTION') node.value = v;
      else node.setAttribute(k, v === true ? '' : v);
    }
  }
  appendKids(node, kids);
  return node;
}
function appendKids(node, kids) {
  for (const k of kids) {
    if (k == null || k === false) continue;
    if (Array.isArray(k)) appendKids(node, k);
    else node.append(k instanceof Node ? k : String(k));
  }
}
const el = (tag, props, ...kids) => build(document.createElement(tag), props, kids);
const sv = (tag, props, ...kids) => build(document.createElementNS(SVG_NS, tag), props, kids);

function icon(name) {
  const paths = {
    copy: 'M5.5 5.5h7v8h-7zM3.5 10.5v-8h7',
    error: '',
    chevron: 'M6 4l4 4-4 4',
    back: 'M10 3 5 8l5 5',
    download: 'M8 2.5v8M4.5 7 8 10.5 11.5 7M3 13.5h10',
    refresh: 'M13 8a5 5 0 1 1-1.5-3.6M13 2.5v3h-3',
    link: 'M7 9a3 3 0 0 0 4.2 0l2-2a3 3 0 0 0-4.2-4.2l-.8.8M9 7a3 3 0 0 0-4.2 0l-2 2a3 3 0 0 0 4.2 4.2l.8-.8',
  };
  if (name === 'error') {
    return sv('svg', { class: 'ico ico-error', viewBox: '0 0 16 16', 'aria-hidden': 'true' },
      sv('circle', { cx: 8, cy: 8, r: 7 }), sv('path', { d: 'M8 4.2v4.6M8 11.2v.4' }));
  }
  return sv('svg', { class: `ico ico-${name}`, viewBox: '0 0 16 16', 'aria-hidden': 'true' }, sv('path', { d: paths[name] }));
}

function clockIcon() {
  return sv('svg', { class: 'ico ico-clock', viewBox: '0 0 16 16', 'aria-hidden': 'true' },
    sv('circle', { cx: 8, cy: 8, r: 6 }), sv('path', { d: 'M8 4.5V8l2.5 1.5' }));
}

// ───────────────────────────── formatting ─────────────────────────────
function trimNum(x, digits) {
  const s = x.toFixed(digits);
  return s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}
const sig = (x) => { const a = Math.abs(x); return trimNum(x, a >= 100 ? 0 : a >= 10 ? 1 : 2); };

function fmtDur(us) {
  if (us == null || !Number.isFinite(us)) return '—';
  const a = Math.abs(us);
  if (a < 1000) return trimNum(us, a < 10 ? 2 : a < 100 ? 1 : 0) + 'µs';
  if (a < 1e6) return sig(us / 1e3) + 'ms';
  if (a < 60e6) return sig(us / 1e6) + 's';
  if (a < 3600e6) { const m = Math.floor(a / 60e6), s = Math.round((a - m * 60e6) / 1e6); return `${m}m${s ? ' ' + s + 's' : ''}`; }
  const h = Math.floor(a / 3600e6), m = Math.round((a - h * 3600e6) / 60e6);
  return `${h}h${m ? ' ' + m + 'm' : ''}`;
}
const pad = (n, w = 2) => String(n).padStart(w, '0');
function fmtClock(us, withMs = true) {
  const d = new Date(us / 1000);
  const s = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMs ? `${s}.${pad(d.getMilliseconds(), 3)}` : s;
}
function fmtDate(us) {
  const d = new Date(us / 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}
const fmtDateTime = (us) => `${fmtDate(us)} ${fmtClock(us)}`;
function fmtAgo(us) {
  const s = (Date.now() - us / 1000) / 1000;
  if (s < 0) return 'in the future';
  if (s < 45) return 'just now';
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}
function fmtRate(r) {
  if (!r) return '0';
  if (r >= 100) return r.toFixed(0);
  if (r >= 10) return r.toFixed(1);
  if (r >= 1) return r.toFixed(2);
  return String(Number(r.toPrecision(2)));
}
function fmtPct(f) {
  const p = f * 100;
  if (p === 0) return '0%';
  if (p < 0.1) return '<0.1%';
  return (p < 10 ? trimNum(p, 1) : p.toFixed(0)) + '%';
}
const plural = (n, word, pl = word + 's') => `${n} ${n === 1 ? word : pl}`;
const shortId = (id) => (id || '').slice(0, 8);

function niceStep(range, count) {
  if (!(range > 0)) return 1;
  const raw = range / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
}
function durTicks(max, count) {
  const step = niceStep(max, count), out = [];
  for (let t = 0; t <= max * 1.0001; t += step) out.push(t);
  return out;
}

// ───────────────────────────── service colours ─────────────────────────────
// Assigned by sorted order of the service list so colours are stable and distinct.
const PALETTE = ['#5b8def', '#e0a030', '#3fb37f', '#a371f7', '#2fb4c8', '#e8793a',
  '#8cb83a', '#d65db1', '#7c83fd', '#2c9c8c', '#c9a227', '#56a8f5', '#b48ead', '#6fbf9f'];
const colorMap = new Map();
function registerServices(list) {
  for (const s of [...list].sort()) if (!colorMap.has(s)) colorMap.set(s, PALETTE[colorMap.size % PALETTE.length]);
}
function svcColor(s) {
  if (!colorMap.has(s)) colorMap.set(s, PALETTE[colorMap.size % PALETTE.length]);
  return colorMap.get(s);
}
const svcDot = (s) => el('span', { class: 'svc-dot', style: { '--c': svcColor(s) }, 'aria-hidden': 'true' });

// ───────────────────────────── API ─────────────────────────────
class ApiError extends Error {
  constructor(kind, status, message) { super(message); this.kind = kind; this.status = status; }
}
const conn = { ok: true };
function setConn(ok) {
  if (conn.ok === ok) return;
  conn.ok = ok;
  const pill = $('#conn');
  if (pill) pill.hidden = ok;
}

// Relative paths ("api/…") resolve to /api/… when the UI is served at /, and keep
// working if the collector is put behind a path prefix.
async function api(path, { signal, timeout = 30000 } = {}) {
  const ctrl = new AbortController();
  const onAbort = () => ctrl.abort();
  if (signal) { if (signal.aborted) ctrl.abort(); else signal.addEventListener('abort', onAbort, { once: true }); }
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; ctrl.abort(); }, timeout);
  let res, text;
  try {
    res = await fetch('api/' + path, { signal: ctrl.signal, headers: { Accept: 'application/json' }, cache: 'no-store' });
    text = await res.text();
  } catch (e) {
    if (signal && signal.aborted) throw e;
    setConn(false);
    if (timedOut) throw new ApiError('timeout', 0, `The collector did not answer within ${timeout / 1000}s.`);
    throw new ApiError('unreachable', 0, 'Could not reach the collector. Is it running, and is this page served by it?');
  } finally {
    clearTimeout(timer);
    if (signal) signal.removeEventListener('abort', onAbort);
  }
  setConn(true);
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const errs = body && Array.isArray(body.errors) ? body.errors.filter(Boolean) : [];
  if (!res.ok || (errs.length && (body.data == null))) {
    const msg = errs.map((e) => e.msg || JSON.stringify(e)).join('; ') ||
      (text && !/^\s*</.test(text) ? text.trim().slice(0, 300) : '') || res.statusText || 'request failed';
    if (res.status === 502 || res.status === 503 || res.status === 504) setConn(false);
    throw new ApiError('http', res.status, msg);
  }
  if (!body || typeof body !== 'object') throw new ApiError('http', res.status, 'The collector answered with something that is not JSON.');
  return body.data;
}

const cache = { services: null, ops: new Map() };
async function getServices(signal, force = false) {
  if (cache.services && !force) return cache.services;
  const data = await api('services', { signal });
  cache.services = Array.isArray(data) ? [...data].sort() : [];
  registerServices(cache.services);
  return cache.services;
}
async function getOperations(service, signal) {
  if (cache.ops.has(service)) return cache.ops.get(service);
  const data = await api(`services/${encodeURIComponent(service)}/operations`, { signal });
  const list = (Array.isArray(data) ? data : []).map((o) => (typeof o === 'string' ? o : o && o.name)).filter(Boolean).sort();
  cache.ops.set(service, list);
  return list;
}

// ───────────────────────────── trace model ─────────────────────────────
const tagVal = (tags, key) => { const t = (tags || []).find((x) => x.key === key); return t ? t.value : undefined; };
function spanIsError(span) {
  for (const t of span.tags || []) {
    if (t.key === 'error' && (t.value === true || t.value === 'true')) return true;
    if (t.key === 'otel.status_code' && String(t.value).toUpperCase() === 'ERROR') return true;
  }
  return false;
}

// How a span's parent link was made (tracer.link.* tags: set by the agent on the span, or by the
// collector when it stitched the span to its parent). Older agents only wrote tracer.link=tcp-connection.
const CONF_RANK = { low: 1, medium: 2, high: 3 };
const LINK_SOURCES = {
  'tcp-seq': 'parent found by TCP sequence: both ends of the connection saw the same bytes at the same position in the stream',
  'tcp-seq-nat': 'parent found by TCP sequence number, method and path: the addresses differ on each side (NAT or an L4 load balancer), and exactly one client and one server matched',
  'tcp-connection': 'same TCP connection: both ends of the connection were seen by the agent of one host',
  thread: 'same thread: the call was made by the thread serving the parent request, the only request it had in flight',
  'forwarded-request': 'forwarded request line: the outgoing request line equals that of exactly one incoming request in flight in this process',
  'shared-id': 'shared id: the outgoing request\'s path carries an id found in exactly one incoming request in flight in this process',
  'sole-request': 'only request in flight: the parent was the only request the process was serving when the call was made (timing only)',
  traceparent: 'traceparent header: the incoming W3C trace context names the parent span',
  b3: 'B3 header: the incoming B3 trace context names the parent span',
  'forwarded-header': 'forwarded header: the outgoing request forwards the traceparent of exactly one incoming request in flight',
};
const CONF_WORDS = {
  high: 'high confidence: an exact match, or a rule that was never wrong on the workloads it was measured on',
  medium: 'medium confidence: right when the assumption behind it holds (one request at a time, an id not reused, a header neither forged nor forwarded by an untraced proxy)',
  low: 'low confidence: a match on partial evidence; treat the parent as a hint',
};
function linkOf(tags) {
  let source = tagVal(tags, 'tracer.link.source');
  let confidence = tagVal(tags, 'tracer.link.confidence');
  if (source == null && tagVal(tags, 'tracer.link') === 'tcp-connection') { source = 'tcp-connection'; confidence = confidence || 'high'; }
  if (source == null) return null;
  source = String(source);
  confidence = confidence != null ? String(confidence).toLowerCase() : '';
  const by = String(tagVal(tags, 'tracer.link.by') || 'agent');
  const known = LINK_SOURCES[source];
  return {
    source, confidence, by, rank: CONF_RANK[confidence] || 0,
    text: known || `parent link made by "${source}"`,
    replaced: tagVal(tags, 'tracer.link.replaced'),
  };
}
const optNum = (v) => { if (v == null || v === '') return null; const n = Number(v); return Number.isFinite(n) ? n : null; };
function clockOf(tags, warnings) {
  const shift = optNum(tagVal(tags, 'tracer.clock.shift_us'));
  if (shift == null) return null;
  return { shift, rawStart: optNum(tagVal(tags, 'tracer.clock.raw_start_us')),
    warnings: (warnings || []).filter((w) => /clock/i.test(String(w))) };
}
const fmtShift = (us) => (us >= 0 ? '+' : '−') + fmtDur(Math.abs(us));
const CONF_THRESHOLDS = [['all', 'All links'], ['medium', 'Medium+ confidence'], ['high', 'High confidence only']];

// minConf: links whose confidence ranks below it are not followed; those spans become detached roots.
function buildTrace(raw, { minConf = 'all' } = {}) {
  const procs = raw.processes || {};
  const minRank = CONF_RANK[minConf] || 0;
  const spans = (raw.spans || []).map((s) => {
    const proc = procs[s.processID] || s.process || { serviceName: 'unknown', tags: [] };
    const tags = s.tags || [];
    const warnings = Array.isArray(s.warnings) ? s.warnings.filter(Boolean).map(String) : [];
    const host = tagVal(proc.tags, 'host.name');
    return {
      raw: s, id: s.spanID, op: s.operationName || '(unnamed)', start: Number(s.startTime) || 0,
      dur: Math.max(0, Number(s.duration) || 0), tags, logs: s.logs || [],
      refs: s.references || [], proc, service: proc.serviceName || 'unknown',
      host: host != null && host !== '' ? String(host) : null,
      link: linkOf(tags), clock: clockOf(tags, warnings), warnings,
      originalTrace: tagVal(tags, 'tracer.trace_id.original'),
      error: spanIsError(s), kind: tagVal(s.tags, 'span.kind'), children: [],
      parent: null, parentId: null, orphan: false, detached: false, depth: 0,
    };
  });
  const byId = new Map();
  for (const s of spans) if (!byId.has(s.id)) byId.set(s.id, s);
  for (const s of spans) {
    const ref = s.refs.find((r) => r.refType === 'CHILD_OF') || s.refs[0];
    if (ref && ref.spanID && ref.spanID !== s.id) {
      s.parentId = ref.spanID;
      const p = byId.get(ref.spanID);
      if (s.link && s.link.rank && s.link.rank < minRank) s.detached = true;
      else if (p && p !== s) { s.parent = p; p.children.push(s); } else s.orphan = true;
    }
  }
  const byStart = (a, b) => a.start - b.start || a.dur - b.dur;
  let roots = spans.filter((s) => !s.parent).sort(byStart);
  // Depth-first ordering; guards against malformed reference cycles.
  const order = [], seen = new Set();
  const walk = (root) => {
    const stack = [[root, 0]];
    while (stack.length) {
      const [s, d] = stack.pop();
      if (seen.has(s)) continue;
      seen.add(s); s.depth = d; order.push(s);
      s.children.sort(byStart);
      for (let i = s.children.length - 1; i >= 0; i--) stack.push([s.children[i], d + 1]);
    }
  };
  roots.forEach(walk);
  for (const s of spans) if (!seen.has(s)) {        // only reachable through a cycle
    if (s.parent) s.parent.children = s.parent.children.filter((c) => c !== s);
    s.parent = null; s.orphan = true; roots.push(s); walk(s);
  }
  let t0 = Infinity, t1 = -Infinity;
  for (const s of spans) { t0 = Math.min(t0, s.start); t1 = Math.max(t1, s.start + s.dur); }
  if (!spans.length) { t0 = 0; t1 = 0; }
  const services = new Map();
  for (const s of spans) services.set(s.service, (services.get(s.service) || 0) + 1);
  registerServices(services.keys());
  const root = roots.find((r) => !r.parentId) || roots[0] || null;
  const hosts = new Map();
  for (const s of spans) if (s.host) hosts.set(s.host, (hosts.get(s.host) || 0) + 1);
  const shifted = spans.filter((s) => s.clock);
  const reasons = Array.isArray(raw.incompleteReasons) ? raw.incompleteReasons.filter(Boolean).map(String) : [];
  return {
    id: raw.traceID || (spans[0] && spans[0].raw.traceID) || '', raw, spans, order, roots, byId, root,
    start: t0, end: t1, dur: t1 - t0, services, hosts,
    errors: spans.filter((s) => s.error).length,
    maxDepth: spans.reduce((m, s) => Math.max(m, s.depth), 0),
    warnings: Array.isArray(raw.warnings) ? raw.warnings.filter(Boolean).map(String) : [],
    incomplete: raw.incomplete === true || reasons.length > 0, incompleteReasons: reasons,
    shifted, shiftedHosts: [...new Set(shifted.map((s) => s.host || s.service))].sort(),
    detached: spans.filter((s) => s.detached), minConf,
  };
}

// ───────────────────────────── search state ─────────────────────────────
const LOOKBACKS = [['5m', 'Last 5 minutes'], ['15m', 'Last 15 minutes'], ['1h', 'Last hour'], ['6h', 'Last 6 hours'],
  ['24h', 'Last 24 hours'], ['2d', 'Last 2 days'], ['custom', 'Custom range…']];
const UNIT_US = { ns: 0.001, us: 1, 'µs': 1, ms: 1e3, s: 1e6, m: 60e6, h: 3600e6, d: 86400e6 };
function lookbackUs(lb) {
  const m = /^(\d+(?:\.\d+)?)(m|h|d)$/.exec(lb || '');
  return m ? Number(m[1]) * UNIT_US[m[2]] : 3600e6;
}
const DUR_RE = /^(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)$/i;
function normDuration(s) {
  const m = DUR_RE.exec(s.trim());
  if (!m) return null;
  const unit = m[2].toLowerCase().replace('µs', 'us');
  return m[1] + unit;
}
const durToUs = (s) => { const m = DUR_RE.exec(s); return m ? Number(m[1]) * UNIT_US[m[2].toLowerCase()] : NaN; };

// "a=b c=\"d e\"" (or a JSON object) -> { a: "b", c: "d e" }
function parseTags(text) {
  const src = (text || '').trim();
  if (!src) return {};
  if (src.startsWith('{')) {
    let obj;
    try { obj = JSON.parse(src); } catch { throw new Error('Tags look like JSON but do not parse.'); }
    if (!obj || typeof obj !== 'object' || Array.isArray(obj)) throw new Error('Tags JSON must be an object.');
    return Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, String(v)]));
  }
  const out = {};
  const re = /\s*([^\s=]+)=(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|(\S*))/y;
  let pos = 0;
  while (pos < src.length) {
    re.lastIndex = pos;
    const m = re.exec(src);
    if (!m) {
      const rest = src.slice(pos).trim();
      if (!rest) break;
      throw new Error(`Expected key=value at “${rest.split(/\s+/)[0]}”.`);
    }
    out[m[1]] = m[2] != null ? m[2].replace(/\\(.)/g, '$1') : m[3] != null ? m[3] : m[4];
    pos = re.lastIndex;
  }
  return out;
}

const SEARCH_KEYS = ['service', 'operation', 'tags', 'minDuration', 'maxDuration', 'lookback', 'start', 'end', 'limit'];
function stateFromParams(p) {
  const st = {};
  for (const k of SEARCH_KEYS) st[k] = p.get(k) || '';
  if (!st.lookback) st.lookback = '1h';
  if (!st.limit) st.limit = '20';
  return st;
}
function stateToQuery(st) {
  const q = new URLSearchParams();
  for (const k of SEARCH_KEYS) {
    if (!st[k]) continue;
    if ((k === 'start' || k === 'end') && st.lookback !== 'custom') continue;
    q.set(k, st[k]);
  }
  return q.toString();
}
function apiSearchQuery(st) {
  const q = new URLSearchParams();
  q.set('service', st.service);
  if (st.operation) q.set('operation', st.operation);
  const tags = parseTags(st.tags);
  if (Object.keys(tags).length) q.set('tags', JSON.stringify(tags));
  if (st.minDuration) q.set('minDuration', normDuration(st.minDuration) || st.minDuration);
  if (st.maxDuration) q.set('maxDuration', normDuration(st.maxDuration) || st.maxDuration);
  if (st.lookback === 'custom') {
    if (st.start) q.set('start', st.start);
    if (st.end) q.set('end', st.end);
  } else {
    const end = Date.now() * 1000;
    q.set('start', String(Math.round(end - lookbackUs(st.lookback))));
    q.set('end', String(end));
    q.set('lookback', st.lookback);
  }
  q.set('limit', st.limit || '20');
  return q.toString();
}
// datetime-local <-> unix micros
function toLocalInput(us) {
  if (!us) return '';
  const d = new Date(Number(us) / 1000);
  return `${fmtDate(Number(us))}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
const fromLocalInput = (v) => { const t = new Date(v).getTime(); return Number.isFinite(t) ? String(t * 1000) : ''; };

// ───────────────────────────── shared UI bits ─────────────────────────────
function stateBox(kind, title, detail, actions) {
  const glyph = { error: '!', empty: '∅', info: 'i', loading: '' }[kind] || 'i';
  return el('div', { class: `state state-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    kind === 'loading' ? el('div', { class: 'spinner', 'aria-hidden': 'true' }) : el('div', { class: 'state-glyph', 'aria-hidden': 'true' }, glyph),
    el('div', { class: 'state-title' }, title),
    detail ? el('div', { class: 'state-detail' }, detail) : null,
    actions ? el('div', { class: 'state-actions' }, actions) : null);
}
function errorBox(err, retry, what = 'load data') {
  const unreachable = err.kind === 'unreachable' || err.kind === 'timeout' || [502, 503, 504].includes(err.status);
  const title = unreachable ? 'Collector unreachable' : `Collector returned an error${err.status ? ` (HTTP ${err.status})` : ''}`;
  const detail = unreachable ? `${err.message} Could not ${what}.` : err.message;
  return stateBox('error', title, detail,
    retry ? el('button', { class: 'btn', type: 'button', onclick: retry }, icon('refresh'), 'Retry') : null);
}

let toastTimer = 0;
function toast(msg) {
  const t = $('#toast');
  t.textContent = msg; t.classList.add('show');
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.remove('show'), 1600);
}
async function copyText(text, label = 'Copied') {
  try { await navigator.clipboard.writeText(text); } catch {
    const ta = el('textarea', { style: { position: 'fixed', top: '-100px', opacity: '0' } });
    ta.value = text; document.body.append(ta); ta.select();
    try { document.execCommand('copy'); } catch { /* ignore */ }
    ta.remove();
  }
  toast(label);
}
function copyBtn(text, label) {
  return el('button', { class: 'icon-btn small', type: 'button', title: `Copy ${label}`, 'aria-label': `Copy ${label}`,
    onclick: (e) => { e.stopPropagation(); copyText(text, `Copied ${label}`); } }, icon('copy'));
}

// Floating tooltip shared by the SVG charts.
const tip = {
  show(evt, content) {
    const t = $('#tooltip');
    t.replaceChildren(...(Array.isArray(content) ? content : [content]));
    t.hidden = false;
    this.move(evt);
  },
  move(evt) {
    const t = $('#tooltip');
    if (t.hidden) return;
    const r = t.getBoundingClientRect();
    let x = evt.clientX + 14, y = evt.clientY + 14;
    if (x + r.width > innerWidth - 8) x = evt.clientX - r.width - 14;
    if (y + r.height > innerHeight - 8) y = evt.clientY - r.height - 14;
    t.style.left = `${Math.max(4, x)}px`; t.style.top = `${Math.max(4, y)}px`;
  },
  hide() { $('#tooltip').hidden = true; },
};

// ───────────────────────────── router ─────────────────────────────
const app = () => $('#app');
let page = null;
let lastSearchHash = '#/search';

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/search';
  const qi = raw.indexOf('?');
  const path = qi >= 0 ? raw.slice(0, qi) : raw;
  const params = new URLSearchParams(qi >= 0 ? raw.slice(qi + 1) : '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, params };
}

function route() {
  const { parts, params } = parseHash();
  let name = parts[0] || 'search', key = name;
  if (name === 'trace') key = `trace:${parts[1] || ''}`;
  tip.hide();
  for (const a of $$('.nav a')) a.classList.toggle('active', a.dataset.nav === (name === 'trace' ? 'search' : name));
  if (name === 'search') lastSearchHash = location.hash && location.hash.includes('?') ? location.hash : lastSearchHash;
  $('.nav a[data-nav="search"]').setAttribute('href', lastSearchHash);
  if (page && page.key === key && page.update) { page.update(params); return; }
  if (page && page.destroy) page.destroy();
  const root = app();
  root.replaceChildren();
  root.scrollTop = 0; window.scrollTo(0, 0);
  if (name === 'search') page = SearchPage(root, params);
  else if (name === 'trace' && parts[1]) page = TracePage(root, parts[1], params);
  else if (name === 'map') page = MapPage(root, params);
  else {
    page = { key: 'notfound' };
    root.append(el('div', { class: 'page page-pad' }, stateBox('empty', 'Page not found', `Nothing lives at #${parts.join('/')}.`,
      el('a', { class: 'btn', href: '#/search' }, 'Go to search'))));
  }
  page.key = key;
  document.title = page.title || 'tracer';
}

// ───────────────────────────── search page ─────────────────────────────
let searchCache = null;           // { key, traces, fetchedAt, tookMs }
let resultSort = 'recent';

function SearchPage(root, params) {
  const ctrl = new AbortController();
  let searchCtrl = null, resizeObs = null;
  let state = stateFromParams(params);
  let current = null;             // summaries shown

  // ── form ──
  const fService = el('select', { id: 'f-service', name: 'service', 'aria-label': 'Service' }, el('option', { value: '' }, 'Loading services…'));
  const fOperation = el('select', { id: 'f-operation', name: 'operation', 'aria-label': 'Operation' }, el('option', { value: '' }, 'All operations'));
  const fTags = el('input', { id: 'f-tags', name: 'tags', type: 'text', spellcheck: 'false', autocomplete: 'off',
    placeholder: 'http.response.status_code=500 error=true' });
  const fMin = el('input', { id: 'f-min', name: 'minDuration', type: 'text', spellcheck: 'false', autocomplete: 'off', placeholder: 'min: 1.2ms', 'aria-label': 'Minimum duration' });
  const fMax = el('input', { id: 'f-max', name: 'maxDuration', type: 'text', spellcheck: 'false', autocomplete: 'off', placeholder: 'max: 2s', 'aria-label': 'Maximum duration' });
  const fLookback = el('select', { id: 'f-lookback', name: 'lookback' }, LOOKBACKS.map(([v, l]) => el('option', { value: v }, l)));
  const fStart = el('input', { id: 'f-start', type: 'datetime-local', 'aria-label': 'Start' });
  const fEnd = el('input', { id: 'f-end', type: 'datetime-local', 'aria-label': 'End' });
  const customRow = el('div', { class: 'field custom-range' },
    el('label', { for: 'f-start' }, 'From'), fStart, el('label', { for: 'f-end' }, 'To'), fEnd);
  const fLimit = el('input', { id: 'f-limit', name: 'limit', type: 'number', min: '1', max: '1500', step: '1' });
  const findBtn = el('button', { id: 'find-btn', class: 'btn primary block', type: 'submit' }, 'Find traces');
  const errs = {};
  const field = (label, input, hint, key) => {
    errs[key] = el('div', { class: 'field-error', id: `err-${key}` });
    return el('div', { class: 'field' }, el('label', { for: input.id }, label), input,
      hint ? el('div', { class: 'field-hint' }, hint) : null, errs[key]);
  };
  function durationField() {
    errs.minDuration = el('div', { class: 'field-error' });
    errs.maxDuration = el('div', { class: 'field-error' });
    return el('div', { class: 'field' }, el('label', { for: 'f-min' }, 'Duration'),
      el('div', { class: 'range-inputs' }, fMin, el('span', { class: 'range-sep', 'aria-hidden': 'true' }, '–'), fMax),
      el('div', { class: 'field-hint' }, 'Span duration, e.g. ', el('code', null, '500us'), ', ', el('code', null, '1.5ms'), ', ', el('code', null, '2s')),
      errs.minDuration, errs.maxDuration);
  }
  const form = el('form', { class: 'search-form', novalidate: true, onsubmit: onSubmit },
    el('h2', { class: 'panel-title' }, 'Search traces'),
    field('Service', fService, null, 'service'),
    field('Operation', fOperation, null, 'operation'),
    field('Tags', fTags, el('span', null, 'Space-separated ', el('code', null, 'key=value'), ' pairs'), 'tags'),
    durationField(),
    field('Lookback', fLookback, null, 'lookback'),
    customRow,
    field('Limit results', fLimit, null, 'limit'),
    findBtn,
    el('button', { class: 'btn ghost block small-text', type: 'button', onclick: resetForm }, 'Reset filters'));

  const resultsHead = el('div', { class: 'results-head' });
  const scatterBox = el('div', { class: 'scatter card', hidden: true });
  const listBox = el('div', { class: 'result-list', role: 'list' });
  const body = el('div', { class: 'results-body' });
  const results = el('section', { class: 'results', 'aria-label': 'Search results' }, resultsHead, scatterBox, listBox, body);
  root.append(el('div', { class: 'page search-page' }, el('aside', { class: 'panel' }, form), results));

  fService.addEventListener('change', () => { loadOperations(fService.value, ''); });
  fLookback.addEventListener('change', () => {
    customRow.hidden = fLookback.value !== 'custom';
    if (fLookback.value === 'custom' && !fStart.value) {
      const now = Date.now() * 1000;
      fStart.value = toLocalInput(now - 3600e6); fEnd.value = toLocalInput(now + 60e6);
    }
  });

  function fillForm(st) {
    fTags.value = st.tags; fMin.value = st.minDuration; fMax.value = st.maxDuration;
    fLookback.value = LOOKBACKS.some(([v]) => v === st.lookback) ? st.lookback : '1h';
    customRow.hidden = fLookback.value !== 'custom';
    fStart.value = toLocalInput(st.start); fEnd.value = toLocalInput(st.end);
    fLimit.value = st.limit;
    if (cache.services) selectService(st.service, st.operation);
  }

  function selectService(service, operation) {
    if (service && !Array.from(fService.options).some((o) => o.value === service)) {
      fService.append(el('option', { value: service }, `${service} (not seen)`));
    }
    if (service) fService.value = service;
    loadOperations(fService.value, operation);
  }

  async function loadServices() {
    fService.disabled = true;
    try {
      const list = await getServices(ctrl.signal);
      if (ctrl.signal.aborted) return;
      fService.replaceChildren(...(list.length ? list.map((s) => el('option', { value: s }, s))
        : [el('option', { value: '' }, 'No services yet')]));
      fService.disabled = !list.length;
      errs.service.textContent = '';
      selectService(state.service || list[0] || '', state.operation);
      if (!list.length && !state.service) {
        showBody(stateBox('empty', 'No services have reported spans yet',
          'Once tracer agents send spans to this collector (OTLP), their services show up here.',
          el('button', { class: 'btn', type: 'button', onclick: () => { cache.services = null; loadServices(); } }, icon('refresh'), 'Check again')));
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
      fService.replaceChildren(el('option', { value: '' }, 'Unavailable'));
      errs.service.textContent = 'Could not load services.';
      if (!state.service) showBody(errorBox(e, () => loadServices(), 'load the service list'));
    }
  }

  async function loadOperations(service, wanted) {
    const keep = wanted != null ? wanted : fOperation.value;
    fOperation.replaceChildren(el('option', { value: '' }, 'All operations'));
    if (!service) return;
    fOperation.disabled = true;
    try {
      const ops = await getOperations(service, ctrl.signal);
      if (ctrl.signal.aborted || fService.value !== service) return;
      fOperation.append(...ops.map((o) => el('option', { value: o }, o)));
      if (keep && !ops.includes(keep)) fOperation.append(el('option', { value: keep }, `${keep} (not seen)`));
      fOperation.value = keep || '';
    } catch (e) {
      if (ctrl.signal.aborted) return;
      errs.operation.textContent = 'Could not load operations.';
      if (keep) { fOperation.append(el('option', { value: keep }, keep)); fOperation.value = keep; }
    } finally { fOperation.disabled = false; }
  }

  function readForm() {
    const st = {
      service: fService.value, operation: fOperation.value, tags: fTags.value.trim(),
      minDuration: fMin.value.trim(), maxDuration: fMax.value.trim(), lookback: fLookback.value,
      start: '', end: '', limit: fLimit.value.trim() || '20',
    };
    if (st.lookback === 'custom') { st.start = fromLocalInput(fStart.value); st.end = fromLocalInput(fEnd.value); }
    return st;
  }
  function validate(st) {
    for (const k of Object.keys(errs)) errs[k].textContent = '';
    for (const i of [fTags, fMin, fMax, fLimit, fService]) i.removeAttribute('aria-invalid');
    const bad = [];
    const fail = (key, input, msg) => { errs[key].textContent = msg; input.setAttribute('aria-invalid', 'true'); bad.push(input); };
    if (!st.service) fail('service', fService, 'Pick a service.');
    try { parseTags(st.tags); } catch (e) { fail('tags', fTags, e.message); }
    for (const [k, inp] of [['minDuration', fMin], ['maxDuration', fMax]]) {
      if (st[k] && !normDuration(st[k])) fail(k, inp, `${k === 'minDuration' ? 'Min' : 'Max'}: use a number and unit, like 500us, 1.5ms or 2s.`);
    }
    if (st.minDuration && st.maxDuration && normDuration(st.minDuration) && normDuration(st.maxDuration) &&
      durToUs(st.minDuration) > durToUs(st.maxDuration)) fail('maxDuration', fMax, 'Max is below min.');
    const lim = Number(st.limit);
    if (!Number.isInteger(lim) || lim < 1 || lim > 1500) fail('limit', fLimit, 'Between 1 and 1500.');
    if (st.lookback === 'custom') {
      if (!st.start || !st.end) fail('lookback', fLookback, 'Set both ends of the range.');
      else if (Number(st.start) >= Number(st.end)) fail('lookback', fLookback, '“From” must be before “To”.');
    }
    if (bad.length) bad[0].focus();
    return !bad.length;
  }
  function onSubmit(e) {
    e.preventDefault();
    const st = readForm();
    if (!validate(st)) return;
    const hash = `#/search?${stateToQuery(st)}`;
    if (location.hash === hash) { state = st; runSearch(true); } else location.hash = hash;
  }
  function resetForm() {
    fTags.value = ''; fMin.value = ''; fMax.value = ''; fLookback.value = '1h'; customRow.hidden = true; fLimit.value = '20';
    fOperation.value = '';
    for (const k of Object.keys(errs)) errs[k].textContent = '';
  }

  function showBody(node) {
    resultsHead.replaceChildren(); scatterBox.hidden = true; listBox.replaceChildren();
    body.replaceChildren(node);
  }

  async function runSearch(force) {
    if (!state.service) {
      showBody(stateBox('info', 'Find traces', 'Pick a service (and optionally an operation, tags or a duration range), then press Find traces.'));
      return;
    }
    let query;
    try { query = apiSearchQuery(state); } catch (e) { showBody(stateBox('error', 'Invalid search', e.message)); return; }
    const key = stateToQuery(state);
    lastSearchHash = `#/search?${key}`;
    if (!force && searchCache && searchCache.key === key) { render(searchCache); return; }
    if (searchCtrl) searchCtrl.abort();
    searchCtrl = new AbortController();
    const sig_ = searchCtrl.signal;
    findBtn.disabled = true; findBtn.textContent = 'Searching…';
    showBody(stateBox('loading', 'Searching traces…'));
    const t0 = performance.now();
    try {
      const data = await api(`traces?${query}`, { signal: sig_ });
      if (sig_.aborted) return;
      const traces = (Array.isArray(data) ? data : []).map(buildTrace).filter((t) => t.spans.length);
      searchCache = { key, traces, fetchedAt: Date.now(), tookMs: performance.now() - t0 };
      render(searchCache);
    } catch (e) {
      if (sig_.aborted) return;
      showBody(errorBox(e, () => runSearch(true), 'run the search'));
    } finally {
      if (!sig_.aborted) { findBtn.disabled = false; findBtn.textContent = 'Find traces'; }
    }
  }

  function summarize(t) {
    const root = t.root;
    return {
      id: t.id, trace: t, service: root ? root.service : 'unknown', op: root ? root.op : '(no root span)',
      spans: t.spans.length, errors: t.errors, start: t.start, dur: t.dur, services: t.services,
      orphan: !root || !!root.parentId, incomplete: t.incomplete, reasons: t.incompleteReasons,
    };
  }

  const SORTS = { recent: ['Most recent', (a, b) => b.start - a.start], longest: ['Longest first', (a, b) => b.dur - a.dur],
    shortest: ['Shortest first', (a, b) => a.dur - b.dur], spans: ['Most spans', (a, b) => b.spans - a.spans],
    errors: ['Most errors', (a, b) => b.errors - a.errors || b.start - a.start] };

  function render(res) {
    body.replaceChildren();
    current = res.traces.map(summarize);
    if (!current.length) {
      resultsHead.replaceChildren(); scatterBox.hidden = true; listBox.replaceChildren();
      const filters = [state.operation && `operation “${state.operation}”`, state.tags && `tags ${state.tags}`,
        state.minDuration && `≥ ${state.minDuration}`, state.maxDuration && `≤ ${state.maxDuration}`].filter(Boolean);
      body.append(stateBox('empty', 'No traces match',
        `Nothing from ${state.service}${filters.length ? ' with ' + filters.join(', ') : ''} in the ${state.lookback === 'custom' ? 'chosen range' : (LOOKBACKS.find(([v]) => v === state.lookback) || ['', 'window'])[1].toLowerCase()}. Try a longer lookback or fewer filters.`));
      return;
    }
    const sortSel = el('select', { class: 'compact', 'aria-label': 'Sort results', onchange: (e) => { resultSort = e.target.value; renderList(); } },
      Object.entries(SORTS).map(([k, [l]]) => el('option', { value: k, selected: k === resultSort }, l)));
    const errCount = current.filter((s) => s.errors).length;
    const incCount = current.filter((s) => s.incomplete).length;
    resultsHead.replaceChildren(
      el('div', { class: 'rh-count' }, el('strong', null, plural(current.length, 'trace')),
        errCount ? el('span', { class: 'badge err' }, `${errCount} with errors`) : null,
        incCount ? el('span', { class: 'badge warn', title: 'Traces that may miss spans' }, `${incCount} incomplete`) : null,
        current.length >= Number(state.limit) ? el('span', { class: 'muted' }, `(limit ${state.limit} reached)`) : null),
      el('div', { class: 'rh-right' },
        el('span', { class: 'muted small', title: new Date(res.fetchedAt).toLocaleString() }, `fetched ${fmtClock(res.fetchedAt * 1000, false)} · ${Math.round(res.tookMs)} ms`),
        el('button', { class: 'icon-btn', type: 'button', title: 'Run the search again', 'aria-label': 'Refresh', onclick: () => runSearch(true) }, icon('refresh')),
        sortSel));
    scatterBox.hidden = false;
    drawScatter();
    if (!resizeObs) {
      let raf = 0;
      resizeObs = new ResizeObserver(() => { cancelAnimationFrame(raf); raf = requestAnimationFrame(drawScatter); });
      resizeObs.observe(scatterBox);
    }
    renderList();
  }

  function renderList() {
    const list = [...current].sort(SORTS[resultSort][1]);
    const maxDur = Math.max(1, ...list.map((s) => s.dur));
    listBox.replaceChildren(...list.map((s) => {
      const chips = [...s.services.entries()].sort((a, b) => b[1] - a[1]).map(([svc, n]) =>
        el('span', { class: 'chip', title: `${plural(n, 'span')} from ${svc}` }, svcDot(svc), svc, el('span', { class: 'chip-n' }, n)));
      return el('a', { class: `trace-item${s.errors ? ' has-error' : ''}`, href: `#/trace/${encodeURIComponent(s.id)}`, role: 'listitem',
        dataset: { traceId: s.id }, style: { '--c': svcColor(s.service) },
        onmouseenter: () => highlightDot(s.id, true), onmouseleave: () => highlightDot(s.id, false),
        onfocus: () => highlightDot(s.id, true), onblur: () => highlightDot(s.id, false) },
      el('div', { class: 'ti-main' },
        el('div', { class: 'ti-title' },
          el('span', { class: 'ti-svc' }, s.service), el('span', { class: 'ti-op' }, s.op),
          s.orphan ? el('span', { class: 'badge warn', title: 'The root span of this trace was not received' }, 'partial') : null,
          s.incomplete ? el('span', { class: 'badge warn incomplete-mark',
            title: `Spans may be missing:\n${s.reasons.join('\n') || 'the collector marked this trace incomplete'}` }, 'incomplete') : null),
        el('div', { class: 'ti-meta' },
          el('span', { class: 'badge' }, plural(s.spans, 'span')),
          s.errors ? el('span', { class: 'badge err' }, icon('error'), plural(s.errors, 'error')) : null,
          chips)),
      el('div', { class: 'ti-side' },
        el('div', { class: 'ti-durline' },
          el('div', { class: 'ti-bar' }, el('div', { class: 'ti-bar-fill', style: { width: `${Math.max(0.5, (s.dur / maxDur) * 100)}%` } })),
          el('span', { class: 'ti-dur mono' }, fmtDur(s.dur))),
        el('div', { class: 'ti-when' },
          el('span', { class: 'mono', title: fmtDateTime(s.start) }, `${fmtDate(s.start) === fmtDate(Date.now() * 1000) ? '' : fmtDate(s.start) + ' '}${fmtClock(s.start)}`),
          el('span', { class: 'muted' }, fmtAgo(s.start)),
          el('span', { class: 'ti-id mono', title: s.id }, shortId(s.id)))));
    }));
  }

  function highlightDot(id, on) {
    const dot = scatterBox.querySelector(`[data-trace-id="${CSS.escape(id)}"]`);
    if (dot) dot.classList.toggle('hl', on);
  }

  function drawScatter() {
    if (!current || !current.length || scatterBox.hidden) return;
    const W = Math.max(320, scatterBox.clientWidth), H = 176;
    const m = { l: 58, r: 18, t: 14, b: 28 };
    let x0 = Math.min(...current.map((s) => s.start)), x1 = Math.max(...current.map((s) => s.start));
    if (x1 - x0 < 2e6) { x0 -= 30e6; x1 += 30e6; }
    const padX = (x1 - x0) * 0.04; x0 -= padX; x1 += padX;
    const durs = current.map((s) => s.dur).sort((a, b) => a - b);
    const dMax = Math.max(1, durs[durs.length - 1]), dMed = Math.max(1, durs[Math.floor(durs.length / 2)]);
    const useLog = durs.length >= 5 && dMax / dMed > 25;
    const yMax = useLog ? dMax * 1.6 : dMax * 1.12;
    const yLo = useLog ? 10 ** Math.floor(Math.log10(Math.max(1, durs[0]))) : 0;
    const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
    const Y = useLog
      ? (v) => H - m.b - ((Math.log10(Math.max(v, yLo)) - Math.log10(yLo)) / (Math.log10(yMax) - Math.log10(yLo))) * (H - m.t - m.b)
      : (v) => H - m.b - (v / yMax) * (H - m.t - m.b);
    const yTicks = [];
    if (useLog) {
      const decades = Math.log10(yMax / yLo);
      for (let d = yLo; d <= yMax; d *= 10) for (const f of decades > 3.5 ? [1] : [1, 3]) if (d * f <= yMax) yTicks.push(d * f);
    } else yTicks.push(...durTicks(yMax, 4));
    const svg = sv('svg', { class: 'scatter-svg', width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img',
      'aria-label': 'Trace durations over time' });
    for (const t of yTicks) {
      if (t > yMax) continue;
      svg.append(sv('line', { class: 'grid', x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }),
        sv('text', { class: 'axis-label', x: m.l - 8, y: Y(t) + 3.5, 'text-anchor': 'end' }, fmtDur(t)));
    }
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400].map((s) => s * 1e6);
    const want = (x1 - x0) / Math.max(2, Math.floor((W - m.l - m.r) / 110));
    const step = steps.find((s) => s >= want) || 86400e6;
    const tzOff = new Date().getTimezoneOffset() * 60e6;
    for (let t = Math.ceil((x0 - tzOff) / step) * step + tzOff; t <= x1; t += step) {
      if (X(t) > W - m.r - 16 || X(t) < m.l + 16) continue;
      svg.append(sv('line', { class: 'tick', x1: X(t), x2: X(t), y1: H - m.b, y2: H - m.b + 4 }),
        sv('text', { class: 'axis-label', x: X(t), y: H - m.b + 16, 'text-anchor': 'middle' }, fmtClock(t, false).slice(0, step < 60e6 ? 8 : 5)));
    }
    svg.append(sv('line', { class: 'axis', x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
    if (useLog) svg.append(sv('text', { class: 'axis-label axis-note', x: W - m.r, y: m.t - 2, 'text-anchor': 'end' }, 'duration · log scale'));
    const dots = [...current].sort((a, b) => (a.errors ? 1 : 0) - (b.errors ? 1 : 0));
    for (const s of dots) {
      const r = 3.5 + Math.min(5, Math.sqrt(s.spans));
      const c = sv('circle', { class: `dot${s.errors ? ' err' : ''}`, cx: X(s.start), cy: Y(s.dur), r, dataset: { traceId: s.id },
        tabindex: '-1', style: { '--c': svcColor(s.service) } });
      c.addEventListener('click', () => { location.hash = `#/trace/${encodeURIComponent(s.id)}`; });
      c.addEventListener('mouseenter', (e) => {
        c.classList.add('hl');
        const item = listBox.querySelector(`[data-trace-id="${CSS.escape(s.id)}"]`);
        if (item) item.classList.add('hl');
        tip.show(e, [el('div', { class: 'tt-title' }, svcDot(s.service), `${s.service} · ${s.op}`),
          el('div', { class: 'tt-row' }, el('span', { class: 'mono' }, fmtDur(s.dur)), ' · ', plural(s.spans, 'span'),
            s.errors ? el('span', { class: 'tt-err' }, ` · ${plural(s.errors, 'error')}`) : null),
          el('div', { class: 'tt-row muted mono' }, `${fmtClock(s.start)} · ${shortId(s.id)}`)]);
      });
      c.addEventListener('mousemove', (e) => tip.move(e));
      c.addEventListener('mouseleave', () => {
        c.classList.remove('hl'); tip.hide();
        const item = listBox.querySelector(`[data-trace-id="${CSS.escape(s.id)}"]`);
        if (item) item.classList.remove('hl');
      });
      svg.append(c);
    }
    scatterBox.replaceChildren(svg);
  }

  function onKey(e) {
    const items = $$('.trace-item', listBox);
    if (!items.length) return false;
    const i = items.indexOf(document.activeElement);
    if (e.key === 'j' || e.key === 'ArrowDown') { items[Math.min(items.length - 1, i + 1)].focus(); return true; }
    if (e.key === 'k' || e.key === 'ArrowUp') { items[Math.max(0, i - 1)].focus(); return true; }
    return false;
  }

  fillForm(state);
  loadServices();
  runSearch(false);

  return {
    title: 'Search · tracer',
    onKey,
    update(p) { state = stateFromParams(p); fillForm(state); runSearch(false); },
    destroy() { ctrl.abort(); if (searchCtrl) searchCtrl.abort(); if (resizeObs) resizeObs.disconnect(); },
  };
}

// ───────────────────────────── trace page ─────────────────────────────
let linkThreshold = 'all';        // "hide low-confidence links": kept while the page is open

function TracePage(root, traceId, params) {
  const ctrl = new AbortController();
  let model = null;
  const collapsed = new Set(), open = new Set();
  let selected = null, filter = '';
  const wrap = el('div', { class: 'page trace-page' });
  root.append(wrap);

  async function load() {
    wrap.replaceChildren(el('div', { class: 'page-pad' }, stateBox('loading', `Loading trace ${shortId(traceId)}…`)));
    try {
      const data = await api(`traces/${encodeURIComponent(traceId)}`, { signal: ctrl.signal });
      if (ctrl.signal.aborted) return;
      const raw = Array.isArray(data) ? data[0] : data;
      if (!raw || !Array.isArray(raw.spans) || !raw.spans.length) throw new ApiError('http', 404, 'trace not found');
      model = buildTrace(raw, { minConf: linkThreshold });
      const want = params.get('span');
      if (want && model.byId.has(want)) { selected = want; open.add(want); }
      render();
      if (want) { const r = rowEl(want); if (r) { r.scrollIntoView({ block: 'center' }); r.focus({ preventScroll: true }); } }
    } catch (e) {
      if (ctrl.signal.aborted) return;
      const back = el('a', { class: 'btn', href: lastSearchHash }, icon('back'), 'Back to search');
      wrap.replaceChildren(el('div', { class: 'page-pad' }, e.status === 404
        ? stateBox('empty', 'Trace not found', el('span', null, 'No trace with ID ', el('code', null, traceId),
          ' is stored in the collector. It may have expired, or its spans have not arrived yet.'), [back,
          el('button', { class: 'btn', type: 'button', onclick: load }, icon('refresh'), 'Try again')])
        : errorBox(e, load, 'load this trace')));
    }
  }

  function render() {
    const t = model;
    const root_ = t.root;
    const title = root_ ? [el('span', { class: 'th-svc', style: { '--c': svcColor(root_.service) } }, root_.service), el('span', { class: 'th-op' }, root_.op)]
      : 'Trace';
    const stat = (label, value, cls) => el('div', { class: `stat ${cls || ''}` }, el('dt', null, label), el('dd', null, value));
    const json = new Blob([JSON.stringify({ data: [t.raw] }, null, 2)], { type: 'application/json' });
    const jsonUrl = URL.createObjectURL(json);
    cleanup.push(() => URL.revokeObjectURL(jsonUrl));
    const header = el('header', { class: 'trace-header card' },
      el('div', { class: 'th-top' },
        el('a', { class: 'btn ghost small', href: lastSearchHash, title: 'Back to search results (u)' }, icon('back'), 'Results'),
        el('h1', { class: 'th-title' }, title),
        t.root && t.root.parentId ? el('span', { class: 'badge warn' }, 'root span not received') : null,
        t.incomplete ? el('span', { class: 'badge warn' }, 'incomplete') : null),
      el('div', { class: 'th-id' },
        el('span', { class: 'muted' }, 'Trace ID'), el('code', { class: 'mono', id: 'trace-id' }, t.id),
        copyBtn(t.id, 'trace ID'),
        el('button', { class: 'icon-btn small', type: 'button', title: 'Copy link to this trace', 'aria-label': 'Copy link',
          onclick: () => copyText(location.href.split('?')[0], 'Copied link') }, icon('link')),
        el('a', { class: 'icon-btn small', href: jsonUrl, download: `trace-${t.id}.json`, title: 'Download JSON', 'aria-label': 'Download JSON' }, icon('download'))),
      el('dl', { class: 'th-stats' },
        stat('Started', el('span', { class: 'mono', title: fmtAgo(t.start) }, fmtDateTime(t.start))),
        stat('Duration', el('span', { class: 'mono' }, fmtDur(t.dur))),
        stat('Spans', el('span', { class: 'mono' }, t.spans.length)),
        stat('Depth', el('span', { class: 'mono' }, t.maxDepth + 1)),
        stat('Errors', t.errors ? el('span', { class: 'mono err-text' }, icon('error'), t.errors) : el('span', { class: 'mono' }, '0'), t.errors ? 'stat-err' : ''),
        stat(`Services (${t.services.size})`, el('span', { class: 'svc-chips' },
          [...t.services.entries()].sort((a, b) => b[1] - a[1]).map(([s, n]) =>
            el('span', { class: 'chip' }, svcDot(s), s, el('span', { class: 'chip-n' }, n)))), 'stat-wide'),
        t.hosts.size ? stat(`Hosts (${t.hosts.size})`, el('span', { class: 'svc-chips', id: 'trace-hosts' },
          [...t.hosts.entries()].sort((a, b) => a[0].localeCompare(b[0])).map(([h, n]) =>
            el('span', { class: 'chip host-chip', dataset: { host: h } }, h, el('span', { class: 'chip-n' }, n)))), 'stat-wide') : null),
      traceNotes(t));

    const findInput = el('input', { id: 'trace-find', type: 'search', placeholder: 'Find in trace…  (f)', spellcheck: 'false',
      'aria-label': 'Find spans in this trace', value: filter, oninput: (e) => { filter = e.target.value; applyFilter(); } });
    const matchInfo = el('span', { class: 'muted small', id: 'match-info' });
    const toolbar = el('div', { class: 'wf-toolbar' },
      el('div', { class: 'wf-tools-left' },
        el('button', { class: 'btn small', type: 'button', onclick: () => { collapsed.clear(); renderRows(); } }, 'Expand all'),
        el('button', { class: 'btn small', type: 'button', onclick: () => {
          for (const s of t.spans) if (s.children.length && s.depth >= 1) collapsed.add(s.id);
          renderRows();
        } }, 'Collapse to level 2'),
        el('button', { class: 'btn small', type: 'button', disabled: !open.size, id: 'close-details',
          onclick: () => { open.clear(); renderRows(); } }, 'Close details')),
      el('div', { class: 'wf-tools-right' },
        el('label', { class: 'muted small', for: 'link-threshold', title: 'Links below the chosen confidence are not followed: their spans are shown as detached roots' }, 'Links'),
        el('select', { id: 'link-threshold', class: 'compact', 'aria-label': 'Hide low-confidence links',
          onchange: (e) => setThreshold(e.target.value) },
        CONF_THRESHOLDS.map(([v, l]) => el('option', { value: v, selected: v === t.minConf }, l))),
        matchInfo, findInput));

    const ticks = axisTicks(t.dur);
    const axis = el('div', { class: 'wf-header' },
      el('div', { class: 'wf-name-h' }, 'Service · operation'),
      el('div', { class: 'wf-axis' }, el('div', { class: 'track' },
        ticks.map((v) => el('div', { class: 'axis-tick', style: { left: `${pctOf(v)}%` } }, el('span', null, fmtDur(v)))),
        el('div', { class: 'axis-end' }, fmtDur(t.dur)))));
    const grid = el('div', { class: 'wf-grid', 'aria-hidden': 'true' }, el('div', { class: 'track' },
      ticks.map((v) => el('div', { class: 'grid-line', style: { left: `${pctOf(v)}%` } }))));
    const rows = el('div', { class: 'wf-rows', role: 'tree', 'aria-label': 'Spans' });
    const wide = t.hosts.size > 1 || t.spans.some((s) => s.link || s.clock);
    const wf = el('div', { class: `waterfall card${wide ? ' wf-wide' : ''}`, id: 'waterfall' }, axis, el('div', { class: 'wf-body' }, grid, rows));
    wf.addEventListener('click', onRowsClick);
    wrap.replaceChildren(header, minimap(), toolbar, wf);
    page.title = `${root_ ? root_.op : 'Trace'} · ${shortId(t.id)} · tracer`;
    document.title = page.title;
    renderRows();
  }

  // Rebuilds the tree with links below the threshold cut; open, collapsed and selected spans stay.
  function setThreshold(v) {
    linkThreshold = CONF_THRESHOLDS.some(([k]) => k === v) ? v : 'all';
    model = buildTrace(model.raw, { minConf: linkThreshold });
    render();
    if (selected) { const r = rowEl(selected); if (r) r.scrollIntoView({ block: 'nearest' }); }
  }

  // The notes under the trace header: incomplete (spans may be missing), clock corrections,
  // links hidden by the confidence control, and any other warning the collector attached.
  function traceNotes(t) {
    const notes = [];
    if (t.incomplete) {
      notes.push(el('div', { class: 'trace-banner incomplete-banner', role: 'alert' },
        el('div', { class: 'tb-title' }, icon('error'), 'Incomplete trace: spans may be missing'),
        t.incompleteReasons.length ? el('ul', { class: 'tb-reasons' }, t.incompleteReasons.map((r) => el('li', null, r)))
          : el('div', { class: 'muted' }, 'The collector marked this trace incomplete.'),
        el('div', { class: 'tb-hint muted small' }, 'Late spans are joined when they arrive: reload in a few seconds. ',
          'If the reason stays, the other side was not traced or its spans were dropped (check the agents\' drop counters).')));
    }
    if (t.shifted.length) {
      const shifts = t.shifted.map((s) => s.clock.shift);
      const lo = Math.min(...shifts), hi = Math.max(...shifts);
      notes.push(el('div', { class: 'trace-note clock-note' },
        clockIcon(),
        el('span', null, `Clock correction applied to ${plural(t.shifted.length, 'span')} (${t.shiftedHosts.length === 1 ? 'host' : 'hosts'} ${t.shiftedHosts.join(', ')}), `,
          lo === hi ? `shifted by ${fmtShift(lo)}` : `shifted by ${fmtShift(lo)} to ${fmtShift(hi)}`,
          '. Their hosts\' clocks disagree with their callers\'; times shown are corrected so each server span lies inside its client span. Raw times are in each span\'s details.')));
    }
    if (t.detached.length) {
      notes.push(el('div', { class: 'trace-note links-note' },
        el('span', null, `${plural(t.detached.length, 'link')} below ${t.minConf === 'high' ? 'high' : 'medium'} confidence hidden: `,
          `${t.detached.length === 1 ? 'its span is shown as a detached root' : 'their spans are shown as detached roots'}. `),
        el('button', { class: 'btn small', type: 'button', onclick: () => setThreshold('all') }, 'Show all links')));
    }
    const shown = new Set([...t.incompleteReasons, ...t.shifted.flatMap((s) => s.warnings)]);
    const other = t.warnings.filter((w) => !shown.has(w));
    if (other.length) {
      notes.push(el('div', { class: 'trace-note warn-note' }, el('ul', null, other.map((w) => el('li', null, w)))));
    }
    return notes.length ? el('div', { class: 'th-notes' }, notes) : null;
  }

  const cleanup = [];
  const pctOf = (us) => (model.dur > 0 ? (us / model.dur) * 100 : 0);
  function axisTicks(dur) { return durTicks(dur, 5).filter((v) => pctOf(v) < 92); }

  function minimap() {
    const t = model, n = t.order.length;
    const H = Math.min(56, Math.max(18, n * 3));
    const svg = sv('svg', { class: 'minimap-svg', viewBox: `0 0 1000 ${H}`, preserveAspectRatio: 'none', 'aria-hidden': 'true' });
    const rowH = H / Math.max(n, 1);
    t.order.forEach((s, i) => {
      const w = t.dur > 0 ? Math.max(1.5, (s.dur / t.dur) * 1000) : 1000;
      const x = t.dur > 0 ? ((s.start - t.start) / t.dur) * 1000 : 0;
      svg.append(sv('rect', { x, y: i * rowH, width: w, height: Math.max(1, rowH * 0.7), class: s.error ? 'mm err' : 'mm',
        style: { '--c': svcColor(s.service) } }));
    });
    return el('div', { class: 'minimap card', title: 'Trace overview' }, svg);
  }

  function visibleSpans() {
    const out = [];
    const stack = [...model.roots].reverse();
    while (stack.length) {
      const s = stack.pop();
      out.push(s);
      if (!collapsed.has(s.id)) for (let i = s.children.length - 1; i >= 0; i--) stack.push(s.children[i]);
    }
    return out;
  }
  const countDesc = (s) => { let n = 0; const st = [...s.children]; while (st.length) { const c = st.pop(); n++; st.push(...c.children); } return n; };

  function matches(s, q) {
    if (!q) return false;
    const hay = [s.service, s.op, s.id, s.host || '', ...s.tags.map((x) => `${x.key}=${x.value}`)].join('\n').toLowerCase();
    return hay.includes(q);
  }

  // Re-marks matches without rebuilding rows.
  function applyFilter() {
    const q = filter.trim().toLowerCase();
    let shown = 0;
    for (const r of $$('.span-row', wrap)) {
      const m = !!q && matches(model.byId.get(r.dataset.spanId), q);
      if (m) shown++;
      r.classList.toggle('match', m);
      r.classList.toggle('dim', !!q && !m);
    }
    updateMatchInfo(q, shown);
  }
  function updateMatchInfo(q, shown) {
    const info = $('#match-info', wrap);
    if (!info) return;
    if (q) {
      const total = model.spans.filter((s) => matches(s, q)).length;
      info.textContent = `${total} of ${model.spans.length} match${total > shown ? ` (${total - shown} inside collapsed spans)` : ''}`;
    } else info.textContent = '';
  }

  function renderRows() {
    const rows = $('.wf-rows', wrap);
    if (!rows) return;
    const q = filter.trim().toLowerCase();
    const t = model;
    const frag = [];
    let nMatch = 0;
    for (const s of visibleSpans()) {
      const isMatch = matches(s, q);
      if (isMatch) nMatch++;
      frag.push(spanRow(s, q, isMatch));
      if (open.has(s.id)) frag.push(spanDetail(s));
    }
    rows.replaceChildren(...frag);
    updateMatchInfo(q, nMatch);
    const cd = $('#close-details', wrap);
    if (cd) cd.disabled = !open.size;
  }

  function spanRow(s, q, isMatch) {
    const t = model;
    const left = t.dur > 0 ? ((s.start - t.start) / t.dur) * 100 : 0;
    const width = t.dur > 0 ? (s.dur / t.dur) * 100 : 100;
    const hasKids = s.children.length > 0;
    const isCollapsed = collapsed.has(s.id);
    const cls = ['span-row', s.error && 'is-error', selected === s.id && 'selected', open.has(s.id) && 'open',
      q && (isMatch ? 'match' : 'dim'), s.orphan && 'orphan', s.detached && 'detached'].filter(Boolean).join(' ');
    const logTicks = s.logs.map((l) => {
      const p = t.dur > 0 ? ((Number(l.timestamp) - t.start) / t.dur) * 100 : 0;
      return el('span', { class: 'log-tick', style: { left: `${Math.min(100, Math.max(0, p))}%` }, title: (l.fields || []).map((f) => `${f.key}=${f.value}`).join(' ') });
    });
    return el('div', { class: cls, role: 'treeitem', tabindex: selected === s.id ? '0' : '-1',
      'aria-level': s.depth + 1, 'aria-expanded': hasKids ? String(!isCollapsed) : null, 'aria-selected': String(selected === s.id),
      dataset: { spanId: s.id, depth: s.depth, parentId: s.parent ? s.parent.id : '' }, style: { '--c': svcColor(s.service) } },
    el('div', { class: 'sr-name', style: { '--depth': s.depth } },
      el('span', { class: 'sr-indent', 'aria-hidden': 'true' }),
      hasKids ? el('button', { class: `sr-toggle${isCollapsed ? '' : ' expanded'}`, type: 'button', tabindex: '-1',
        title: isCollapsed ? `Expand (${countDesc(s)} hidden)` : 'Collapse', 'aria-label': isCollapsed ? 'Expand' : 'Collapse' }, icon('chevron'))
        : el('span', { class: 'sr-toggle-spacer' }),
      el('span', { class: 'sr-svc' }, s.service),
      s.host && t.hosts.size > 1 ? el('span', { class: 'sr-host mono', title: `host.name ${s.host}` }, s.host) : null,
      el('span', { class: 'sr-op', title: s.op }, s.op),
      isCollapsed ? el('span', { class: 'badge tiny' }, `+${countDesc(s)}`) : null,
      s.error ? el('span', { class: 'sr-err', title: 'Error' }, icon('error')) : null,
      s.link && s.parentId ? linkBadge(s) : null,
      s.clock ? el('span', { class: 'clock-badge', dataset: { shiftUs: s.clock.shift },
        title: `Clock corrected: shifted by ${fmtShift(s.clock.shift)}${s.host ? ` (host ${s.host})` : ''} so it lies inside its parent` },
      clockIcon(), fmtShift(s.clock.shift)) : null,
      s.orphan ? el('span', { class: 'badge warn tiny', title: `Parent span ${s.parentId} was not received` }, 'parent not received') : null),
    el('div', { class: 'sr-timeline' }, el('div', { class: 'track' },
      el('div', { class: 'span-bar', style: { left: `${left}%`, width: `${width}%` } }),
      logTicks,
      el('span', { class: 'sr-dur mono', style: { left: `calc(${left + width}% + 6px)` } }, fmtDur(s.dur)))));
  }

  function linkBadge(s) {
    const l = s.link;
    const byCollector = l.by === 'collector';
    const title = `Parent link: ${l.text}.\n${l.confidence ? CONF_WORDS[l.confidence] || `confidence ${l.confidence}` : 'confidence not given'}.\n` +
      `Made by the ${byCollector ? 'collector when it stitched the trace' : `agent${s.host ? ` on ${s.host}` : ''}`}.` +
      (s.detached ? '\nHidden by the link confidence filter: shown as a detached root.' : '');
    return el('span', { class: ['link-badge', `conf-${l.confidence || 'unknown'}`, byCollector ? 'by-collector' : 'by-agent', s.detached && 'detached'].filter(Boolean).join(' '),
      title, dataset: { source: l.source, confidence: l.confidence, by: l.by } },
    el('span', { class: 'lb-src' }, l.source),
    l.confidence ? el('span', { class: 'lb-conf' }, l.confidence) : null,
    byCollector ? el('span', { class: 'lb-by' }, 'collector') : null,
    s.detached ? el('span', { class: 'lb-hidden' }, 'hidden') : null);
  }

  // The span's parent link and clock correction in words.
  function provenance(s) {
    const t = model;
    const items = [];
    const row = (k, v) => el('div', { class: 'sd-item' }, el('dt', null, k), el('dd', null, v));
    if (s.parentId) {
      if (s.link) {
        const l = s.link;
        items.push(el('p', { class: 'link-text' }, l.text.charAt(0).toUpperCase() + l.text.slice(1), '.'),
          el('dl', { class: 'sd-prov-kv' },
            row('Source', el('code', { class: 'mono' }, l.source)),
            row('Confidence', el('span', { class: `conf-text conf-${l.confidence || 'unknown'}` }, l.confidence || 'not given')),
            row('Made by', el('span', null, l.by === 'collector' ? 'the collector (stitched across agents)' : `the agent${s.host ? ` on ${s.host}` : ''}`)),
            l.replaced ? row('Replaced parent', el('code', { class: 'mono' }, String(l.replaced))) : null,
            s.originalTrace ? row('Stored in trace', el('code', { class: 'mono' }, String(s.originalTrace))) : null));
        if (l.confidence && CONF_WORDS[l.confidence]) items.push(el('p', { class: 'muted small' }, CONF_WORDS[l.confidence].replace(/^\w+ confidence: /, (m) => m.charAt(0).toUpperCase() + m.slice(1))));
        if (l.replaced) items.push(el('p', { class: 'muted small' }, `The collector found a better parent and replaced ${l.replaced}.`));
        if (s.detached) items.push(el('p', { class: 'warn-text small' }, 'This link is hidden by the link confidence filter: the span is shown as a detached root.'));
      } else {
        items.push(el('p', { class: 'link-text' }, 'Parent set by the sender of the span (an instrumented application\'s own trace context); no provenance recorded.'));
      }
    }
    if (s.clock) {
      const c = s.clock;
      items.push(el('div', { class: 'sd-clock' },
        el('p', { class: 'clock-text' }, clockIcon(), `Clock corrected: shifted by ${fmtShift(c.shift)}${s.host ? ` (host ${s.host})` : ''} so it lies inside its parent.`),
        el('dl', { class: 'sd-prov-kv' },
          row('Shift', el('span', { class: 'mono' }, `${c.shift >= 0 ? '+' : ''}${c.shift} µs`)),
          c.rawStart != null ? row('Raw start', el('span', { class: 'mono raw-start', title: `${c.rawStart} µs since the epoch` },
            fmtDateTime(c.rawStart), el('span', { class: 'muted' }, `  (${fmtShift(c.rawStart - t.start)} from the trace's corrected start)`))) : null,
          row('Shown start', el('span', { class: 'mono' }, fmtDateTime(s.start))))));
    }
    const otherWarnings = s.warnings.filter((w) => !(s.clock && s.clock.warnings.includes(w)));
    if (s.clock && s.clock.warnings.length) items.push(el('ul', { class: 'sd-warnings muted small' }, s.clock.warnings.map((w) => el('li', null, w))));
    if (otherWarnings.length) items.push(el('ul', { class: 'sd-warnings warn-text small' }, otherWarnings.map((w) => el('li', null, w))));
    if (!items.length) return null;
    return el('section', { class: 'sd-prov' }, el('h4', null, s.clock && !s.parentId ? 'Clock' : 'Parent link'), items);
  }

  function kvTable(tags, cls, emptyMsg) {
    if (!tags || !tags.length) return el('div', { class: 'muted small empty-kv' }, emptyMsg);
    const sorted = [...tags].sort((a, b) => a.key.localeCompare(b.key));
    return el('table', { class: `kv ${cls}` }, el('tbody', null, sorted.map((tg) => {
      const errRow = (tg.key === 'error' && (tg.value === true || tg.value === 'true')) ||
        (tg.key === 'otel.status_code' && String(tg.value).toUpperCase() === 'ERROR') || tg.key === 'otel.status_description' ||
        tg.key.startsWith('exception.') || (/status_code$/.test(tg.key) && /^http/.test(tg.key) && Number(tg.value) >= 500);
      const warnRow = /status_code$/.test(tg.key) && /^http/.test(tg.key) && Number(tg.value) >= 400 && Number(tg.value) < 500;
      return el('tr', { class: errRow ? 'kv-err' : warnRow ? 'kv-warn' : null },
        el('td', { class: 'kv-key mono' }, breakDots(tg.key)),
        el('td', { class: 'kv-val' }, fmtTagValue(tg)),
        el('td', { class: 'kv-type muted' }, tg.type || ''));
    })));
  }
  function breakDots(key) {
    const parts = String(key).split('.');
    return parts.map((p, i) => (i < parts.length - 1 ? [p + '.', el('wbr')] : p));
  }
  function fmtTagValue(tg) {
    const v = tg.value;
    if (typeof v === 'string' && /^[[{]/.test(v.trim())) {
      try { return el('pre', { class: 'mono json' }, JSON.stringify(JSON.parse(v), null, 2)); } catch { /* plain */ }
    }
    if (typeof v === 'object' && v !== null) return el('pre', { class: 'mono json' }, JSON.stringify(v, null, 2));
    return el('span', { class: `mono v-${tg.type || 'string'}` }, String(v));
  }

  function spanDetail(s) {
    const t = model;
    const status = tagVal(s.tags, 'otel.status_code');
    const statusDesc = tagVal(s.tags, 'otel.status_description');
    const kv = (k, v) => el('div', { class: 'sd-item' }, el('dt', null, k), el('dd', null, v));
    const jump = (id) => el('a', { class: 'mono link', href: '#', onclick: (e) => { e.preventDefault(); e.stopPropagation(); focusSpan(id, true); } }, id);
    const otherRefs = s.refs.filter((r) => !(r.refType === 'CHILD_OF' && r.spanID === s.parentId));
    return el('div', { class: `span-detail${s.error ? ' is-error' : ''}`, role: 'region', 'aria-label': `Details of ${s.op}`,
      dataset: { detailFor: s.id }, style: { '--c': svcColor(s.service) } },
    el('div', { class: 'sd-head' },
      el('div', { class: 'sd-title' }, svcDot(s.service), el('strong', null, s.service), el('span', { class: 'sd-op' }, s.op),
        s.error ? el('span', { class: 'badge err' }, icon('error'), 'error') : null),
      el('button', { class: 'icon-btn small', type: 'button', title: 'Close (Esc)', 'aria-label': 'Close details',
        onclick: (e) => { e.stopPropagation(); toggleDetail(s.id); } }, '×')),
    el('dl', { class: 'sd-summary' },
      kv('Span ID', el('span', { class: 'idcell' }, el('code', { class: 'mono' }, s.id), copyBtn(s.id, 'span ID'))),
      kv('Parent ID', s.parentId ? (s.parent ? jump(s.parentId)
        : s.detached && t.byId.has(s.parentId) ? el('span', null, jump(s.parentId), el('span', { class: 'badge warn tiny' }, 'link hidden'))
          : el('span', null, el('code', { class: 'mono' }, s.parentId), el('span', { class: 'badge warn tiny' }, 'not received')))
        : el('span', { class: 'muted' }, 'none (root)')),
      kv('Kind', el('span', { class: 'mono' }, s.kind || '—')),
      s.host ? kv('Host', el('span', { class: 'mono sd-host' }, s.host)) : null,
      kv('Status', el('span', { class: `mono ${s.error ? 'err-text' : ''}` },
        status || (s.error ? 'ERROR' : 'UNSET'), statusDesc ? ` — ${statusDesc}` : '')),
      kv('Start', el('span', { class: 'mono', title: fmtDateTime(s.start) }, `+${fmtDur(s.start - t.start)}`,
        s.clock ? el('span', { class: 'clock-badge', title: 'Clock corrected: see below' }, clockIcon(), fmtShift(s.clock.shift)) : null)),
      kv('Duration', el('span', { class: 'mono' }, fmtDur(s.dur), t.dur ? el('span', { class: 'muted' }, `  ${fmtPct(s.dur / t.dur)} of trace`) : null)),
      s.children.length ? kv('Children', el('span', { class: 'mono' }, `${s.children.length} direct, ${countDesc(s)} total`)) : null),
    el('div', { class: 'sd-sections' },
      provenance(s),
      el('section', { class: 'sd-tags' }, el('h4', null, 'Span attributes ', el('span', { class: 'count' }, s.tags.length)),
        kvTable(s.tags, 'kv-span', 'No attributes.')),
      el('section', { class: 'sd-process' }, el('h4', null, 'Process / resource ', el('span', { class: 'count' }, (s.proc.tags || []).length)),
        kvTable([{ key: 'service.name', type: 'string', value: s.service }, ...(s.proc.tags || [])], 'kv-proc', 'No resource attributes.')),
      el('section', { class: 'sd-logs' }, el('h4', null, 'Events ', el('span', { class: 'count' }, s.logs.length)),
        s.logs.length ? el('ol', { class: 'events' }, [...s.logs].sort((a, b) => a.timestamp - b.timestamp).map((l) => {
          const isExc = (l.fields || []).some((f) => (f.key === 'event' && f.value === 'exception') || f.key.startsWith('exception.'));
          return el('li', { class: isExc ? 'ev-err' : null },
            el('div', { class: 'ev-time mono' }, `+${fmtDur(Number(l.timestamp) - t.start)}`,
              el('span', { class: 'muted' }, `  (+${fmtDur(Number(l.timestamp) - s.start)} in span)`)),
            kvTable(l.fields || [], 'kv-event', 'No fields.'));
        })) : el('div', { class: 'muted small empty-kv' }, 'No events.')),
      otherRefs.length ? el('section', { class: 'sd-refs' }, el('h4', null, 'References'),
        el('ul', null, otherRefs.map((r) => el('li', null, el('span', { class: 'mono muted' }, r.refType, ' '),
          model.byId.has(r.spanID) ? jump(r.spanID) : el('code', { class: 'mono' }, r.spanID),
          r.traceID && r.traceID !== t.id ? el('span', null, ' in ', el('a', { class: 'mono link', href: `#/trace/${r.traceID}` }, shortId(r.traceID))) : null))))
        : null));
  }

  function rowEl(id) { return $(`.span-row[data-span-id="${CSS.escape(id)}"]`, wrap); }
  function syncUrl() {
    const base = `#/trace/${encodeURIComponent(traceId)}`;
    history.replaceState(null, '', selected && open.has(selected) ? `${base}?span=${encodeURIComponent(selected)}` : base);
  }
  function focusSpan(id, reveal) {
    if (reveal) { for (let p = model.byId.get(id); p && p.parent; p = p.parent) collapsed.delete(p.parent.id); }
    selected = id;
    renderRows();
    const r = rowEl(id);
    if (r) { r.focus({ preventScroll: true }); r.scrollIntoView({ block: 'nearest' }); }
  }
  function setSelected(id) {
    for (const x of $$('.span-row.selected', wrap)) { x.classList.remove('selected'); x.tabIndex = -1; x.setAttribute('aria-selected', 'false'); }
    selected = id;
    const r = id && rowEl(id);
    if (r) { r.classList.add('selected'); r.tabIndex = 0; r.setAttribute('aria-selected', 'true'); }
    return r;
  }
  // Opening/closing a detail panel touches only that row (fast on traces with thousands of spans).
  function toggleDetail(id) {
    const r = setSelected(id);
    if (open.has(id)) {
      open.delete(id);
      if (r) { r.classList.remove('open'); const d = r.nextElementSibling; if (d && d.dataset.detailFor === id) d.remove(); }
    } else {
      open.add(id);
      if (r) { r.classList.add('open'); r.after(spanDetail(model.byId.get(id))); }
    }
    if (!r) renderRows();
    const cd = $('#close-details', wrap);
    if (cd) cd.disabled = !open.size;
    syncUrl();
    if (r) r.focus({ preventScroll: true });
  }
  function toggleCollapse(id, want) {
    const s = model.byId.get(id);
    if (!s || !s.children.length) return;
    const isC = collapsed.has(id);
    if (want === undefined ? isC : want) collapsed.delete(id); else collapsed.add(id);
    selected = id; renderRows();
    const r = rowEl(id);
    if (r) r.focus({ preventScroll: true });
  }

  function onRowsClick(e) {
    if (e.target.closest('.span-detail')) return;
    const row = e.target.closest('.span-row');
    if (!row) return;
    const id = row.dataset.spanId;
    if (e.target.closest('.sr-toggle')) { toggleCollapse(id); return; }
    toggleDetail(id);
  }

  function onKey(e) {
    if (!model) return false;
    const rows = $$('.span-row', wrap);
    if (!rows.length) return false;
    let i = rows.findIndex((r) => r.dataset.spanId === selected);
    const go = (j) => { const r = setSelected(rows[Math.max(0, Math.min(rows.length - 1, j))].dataset.spanId);
      r.focus({ preventScroll: true }); r.scrollIntoView({ block: 'nearest' }); };
    switch (e.key) {
      case 'j': case 'ArrowDown': go(i + 1); return true;
      case 'k': case 'ArrowUp': go(i < 0 ? 0 : i - 1); return true;
      case 'Home': go(0); return true;
      case 'End': go(rows.length - 1); return true;
      case 'Enter': case ' ': case 'o': if (selected) toggleDetail(selected); return true;
      case 'ArrowLeft': case 'h': {
        if (!selected) return false;
        const s = model.byId.get(selected);
        if (s.children.length && !collapsed.has(s.id)) toggleCollapse(s.id, false);
        else if (s.parent) focusSpan(s.parent.id);
        return true;
      }
      case 'ArrowRight': case 'l': if (selected) toggleCollapse(selected, true); return true;
      case 'f': { const f = $('#trace-find', wrap); if (f) { f.focus(); f.select(); } return true; }
      case 'u': location.hash = lastSearchHash; return true;
      case 'Escape': if (open.size) { open.clear(); renderRows(); syncUrl(); if (selected) focusSpan(selected); return true; } return false;
      default: return false;
    }
  }

  load();
  return {
    title: `Trace ${shortId(traceId)} · tracer`,
    onKey,
    destroy() { ctrl.abort(); cleanup.forEach((f) => f()); },
  };
}

// ───────────────────────────── service map ─────────────────────────────
const MAP_LOOKBACKS = [['15m', 'Last 15 minutes'], ['1h', 'Last hour'], ['6h', 'Last 6 hours'], ['24h', 'Last 24 hours'], ['2d', 'Last 2 days'], ['7d', 'Last 7 days']];

function layoutGraph(nodes, edges) {
  const out = new Map(nodes.map((n) => [n, []])), inn = new Map(nodes.map((n) => [n, []]));
  for (const e of edges) if (e.parent !== e.child) { out.get(e.parent).push(e.child); inn.get(e.child).push(e.parent); }
  for (const l of out.values()) l.sort();
  // break cycles with a DFS from the sources, in a deterministic order
  const stateOf = new Map(), back = new Set();
  const order = [...nodes].sort((a, b) => inn.get(a).length - inn.get(b).length || a.localeCompare(b));
  const dfs = (n) => {
    stateOf.set(n, 1);
    for (const c of out.get(n)) {
      if (stateOf.get(c) === 1) back.add(`${n}\u0000${c}`);
      else if (!stateOf.has(c)) dfs(c);
    }
    stateOf.set(n, 2);
  };
  for (const n of order) if (!stateOf.has(n)) dfs(n);
  const isBack = (p, c) => back.has(`${p}\u0000${c}`);
  // longest-path layering over the DAG
  const layer = new Map();
  const indeg = new Map(nodes.map((n) => [n, inn.get(n).filter((p) => !isBack(p, n)).length]));
  const queue = nodes.filter((n) => indeg.get(n) === 0).sort();
  for (const n of queue) layer.set(n, 0);
  while (queue.length) {
    const n = queue.shift();
    for (const c of out.get(n)) {
      if (isBack(n, c)) continue;
      layer.set(c, Math.max(layer.get(c) || 0, layer.get(n) + 1));
      indeg.set(c, indeg.get(c) - 1);
      if (indeg.get(c) === 0) queue.push(c);
    }
  }
  const connected = (n) => out.get(n).length || inn.get(n).length;
  const maxL = Math.max(0, ...layer.values());
  const layers = Array.from({ length: maxL + 1 }, () => []);
  const isolated = [];
  for (const n of [...nodes].sort()) (connected(n) ? layers[layer.get(n) || 0] : isolated).push(n);
  // barycenter sweeps to reduce crossings
  const pos = new Map();
  const index = () => layers.forEach((l) => l.forEach((n, i) => pos.set(n, i)));
  index();
  const bary = (n, nbrs, fallback) => (nbrs.length ? nbrs.reduce((a, m) => a + pos.get(m), 0) / nbrs.length : fallback);
  for (let it = 0; it < 4; it++) {
    for (let L = 1; L < layers.length; L++) {
      layers[L] = layers[L].map((n, i) => [n, bary(n, inn.get(n).filter((p) => layer.get(p) === L - 1), i)])
        .sort((a, b) => a[1] - b[1] || a[0].localeCompare(b[0])).map((x) => x[0]);
      index();
    }
    for (let L = layers.length - 2; L >= 0; L--) {
      layers[L] = layers[L].map((n, i) => [n, bary(n, out.get(n).filter((c) => layer.get(c) === L + 1), i)])
        .sort((a, b) => a[1] - b[1] || a[0].localeCompare(b[0])).map((x) => x[0]);
      index();
    }
  }
  return { layers: layers.filter((l) => l.length), isolated, isBack };
}

function MapPage(root, params) {
  const ctrl = new AbortController();
  let lookback = params.get('lookback') || '1h';
  if (!MAP_LOOKBACKS.some(([v]) => v === lookback)) lookback = '1h';
  const lbSel = el('select', { id: 'map-lookback', class: 'compact', 'aria-label': 'Lookback window',
    onchange: (e) => { location.hash = `#/map?lookback=${e.target.value}`; } },
  MAP_LOOKBACKS.map(([v, l]) => el('option', { value: v, selected: v === lookback }, l)));
  const legend = el('div', { class: 'map-legend' },
    el('span', { class: 'lg lg-ok' }, 'no errors'), el('span', { class: 'lg lg-warn' }, '< 5% errors'), el('span', { class: 'lg lg-bad' }, '≥ 5% errors'));
  const metricSel = el('select', { class: 'compact', 'aria-label': 'Latency shown on edges', onchange: () => draw() },
    el('option', { value: 'p95' }, 'p95 latency'), el('option', { value: 'avg' }, 'avg latency'));
  const head = el('div', { class: 'map-head' },
    el('h2', { class: 'page-title' }, 'Service map'),
    el('div', { class: 'map-controls' }, legend, metricSel, lbSel,
      el('button', { class: 'icon-btn', type: 'button', title: 'Refresh', 'aria-label': 'Refresh', onclick: () => load() }, icon('refresh'))));
  const canvas = el('div', { class: 'map-canvas card', id: 'service-map' });
  const tableBox = el('div', { class: 'map-table' });
  root.append(el('div', { class: 'page map-page' }, head, canvas, tableBox));
  let data = null;

  async function load() {
    canvas.replaceChildren(stateBox('loading', 'Loading dependencies…'));
    tableBox.replaceChildren();
    const lbMs = lookbackUs(lookback) / 1000;
    try {
      const [deps, services] = await Promise.all([
        api(`dependencies?endTs=${Date.now()}&lookback=${Math.round(lbMs)}`, { signal: ctrl.signal }),
        getServices(ctrl.signal, true).catch(() => []),
      ]);
      if (ctrl.signal.aborted) return;
      data = { deps: (Array.isArray(deps) ? deps : []).filter((d) => d && d.parent && d.child), services, lbMs };
      draw();
    } catch (e) {
      if (ctrl.signal.aborted) return;
      canvas.replaceChildren(errorBox(e, load, 'load service dependencies'));
    }
  }

  function edgeClass(errRate) { return errRate >= 0.05 ? 'bad' : errRate > 0 ? 'warn' : 'ok'; }

  function draw() {
    if (!data) return;
    const { deps, lbMs } = data;
    const secs = lbMs / 1000;
    const names = new Set(data.services);
    for (const d of deps) { names.add(d.parent); names.add(d.child); }
    const nodes = [...names].sort();
    registerServices(nodes);
    if (!nodes.length) {
      canvas.replaceChildren(stateBox('empty', 'No services yet', 'The map fills in once the collector has received spans.'));
      return;
    }
    const metric = metricSel.value;
    const edges = deps.map((d) => {
      const calls = Number(d.callCount) || 0, errsN = Number(d.errorCount) || 0;
      const lat = metric === 'avg' ? d.avgDurationMicros : d.p95DurationMicros;
      return { ...d, calls, errs: errsN, rate: calls / secs, errRate: calls ? errsN / calls : 0,
        lat: lat != null ? Number(lat) : (d.avgDurationMicros != null ? Number(d.avgDurationMicros) : null),
        latKind: lat != null ? metric : (d.avgDurationMicros != null ? 'avg' : null) };
    });
    const { layers, isolated, isBack } = layoutGraph(nodes, edges);
    const NW = 200, NH = 56, ROW = 44, PADX = 40, PADY = 50;
    // column gap leaves room for edge labels; shrinks (down to 150px) to fit narrower windows
    const avail = (canvas.clientWidth || 1200) - 2 * PADX - layers.length * NW;
    const COL = layers.length > 1 ? Math.max(150, Math.min(190, avail / (layers.length - 1))) : 190;
    const maxRows = Math.max(1, ...layers.map((l) => l.length));
    const colH = maxRows * NH + (maxRows - 1) * ROW;
    const P = new Map();
    layers.forEach((l, L) => {
      const h = l.length * NH + (l.length - 1) * ROW;
      l.forEach((n, i) => P.set(n, { x: PADX + L * (NW + COL), y: PADY + (colH - h) / 2 + i * (NH + ROW) }));
    });
    const isoY = PADY + (layers.length ? colH + ROW * 1.5 : 0);
    isolated.forEach((n, i) => P.set(n, { x: PADX + i * (NW + 28), y: isoY }));
    const W = Math.max(PADX * 2 + layers.length * NW + Math.max(0, layers.length - 1) * COL, PADX * 2 + isolated.length * (NW + 28));
    const H = (isolated.length ? isoY + NH : PADY + colH) + PADY + 40;

    const inStats = new Map(), outStats = new Map();
    for (const e of edges) {
      const a = inStats.get(e.child) || { calls: 0, errs: 0 }; a.calls += e.calls; a.errs += e.errs; inStats.set(e.child, a);
      const b = outStats.get(e.parent) || { calls: 0 }; b.calls += e.calls; outStats.set(e.parent, b);
    }

    const svg = sv('svg', { id: 'map-svg', class: 'map-svg', viewBox: `0 0 ${W} ${H}`, role: 'img',
      style: { width: `${W}px`, 'min-width': `${Math.round(W * 0.72)}px` },
      'aria-label': `Service dependency graph, ${plural(nodes.length, 'service')}, ${plural(edges.length, 'edge')}` });
    const defs = sv('defs');
    for (const k of ['ok', 'warn', 'bad', 'hl']) {
      defs.append(sv('marker', { id: `arr-${k}`, viewBox: '0 0 10 10', refX: '9', refY: '5', markerWidth: '9', markerHeight: '9',
        markerUnits: 'userSpaceOnUse', orient: 'auto' }, sv('path', { d: 'M0,1 L10,5 L0,9 z', class: `arrow arrow-${k}` })));
    }
    svg.append(defs);
    const edgeLayer = sv('g', { class: 'edges' }), labelLayer = sv('g', { class: 'edge-labels' }), nodeLayer = sv('g', { class: 'nodes' });
    const bez = (p0, p1, p2, p3, t) => {
      const u = 1 - t;
      return [u * u * u * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t * t * t * p3[0],
        u * u * u * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t * t * t * p3[1]];
    };
    const edgeEls = [];
    for (const e of edges) {
      const a = P.get(e.parent), b = P.get(e.child);
      const cls = edgeClass(e.errRate);
      let d, lp;
      if (e.parent === e.child) {
        const x = a.x + NW - 34, y = a.y;
        d = `M ${x} ${y} C ${x} ${y - 46}, ${a.x + NW + 46} ${a.y + NH / 2}, ${a.x + NW} ${a.y + NH / 2}`;
        lp = [a.x + NW + 8, a.y - 30];
      } else if (isBack(e.parent, e.child) || b.x <= a.x) {
        const p0 = [a.x + NW / 2, a.y + NH], p3 = [b.x + NW / 2 + 12, b.y + NH];
        const dip = 60 + Math.abs(p0[0] - p3[0]) * 0.12;
        const p1 = [p0[0], Math.max(p0[1], p3[1]) + dip], p2 = [p3[0], Math.max(p0[1], p3[1]) + dip];
        d = `M ${p0} C ${p1} ${p2} ${p3}`;
        lp = bez(p0, p1, p2, p3, 0.5);
      } else {
        const p0 = [a.x + NW, a.y + NH / 2], p3 = [b.x - 1, b.y + NH / 2];
        const dx = Math.max(50, (p3[0] - p0[0]) * 0.5);
        const p1 = [p0[0] + dx, p0[1]], p2 = [p3[0] - dx, p3[1]];
        d = `M ${p0} C ${p1} ${p2} ${p3}`;
        // put the label in the gap just before the target column
        const targetX = p3[0] - COL / 2;
        let best = 0.5, bd = Infinity;
        for (let t = 0.05; t <= 0.95; t += 0.01) { const q = bez(p0, p1, p2, p3, t); if (Math.abs(q[0] - targetX) < bd) { bd = Math.abs(q[0] - targetX); best = t; } }
        lp = bez(p0, p1, p2, p3, best);
      }
      const width = 1.4 + Math.min(4, Math.log10(e.calls + 1) * 1.2);
      const path = sv('path', { d, class: `edge edge-${cls}`, 'marker-end': `url(#arr-${cls})`, style: { 'stroke-width': `${width}px` } });
      const hit = sv('path', { d, class: 'edge-hit' });
      const line1 = `${fmtRate(e.rate)} req/s`;
      const line2 = [fmtPct(e.errRate) + ' err', e.lat != null ? `${e.latKind} ${fmtDur(e.lat)}` : null].filter(Boolean).join(' · ');
      const lw = Math.max(line1.length, line2.length) * 6.6 + 14;
      const label = sv('g', { class: `edge-label el-${cls}`, transform: `translate(${lp[0]},${lp[1]})` },
        sv('rect', { x: -lw / 2, y: -17, width: lw, height: 34, rx: 6 }),
        sv('text', { class: 'el-1', y: -3, 'text-anchor': 'middle' }, line1),
        sv('text', { class: 'el-2', y: 11, 'text-anchor': 'middle' }, line2));
      const g = { path, label, e };
      edgeEls.push(g);
      const over = (ev) => {
        path.classList.add('hl'); label.classList.add('hl'); path.setAttribute('marker-end', 'url(#arr-hl)');
        tip.show(ev, [el('div', { class: 'tt-title' }, `${e.parent} → ${e.child}`),
          el('div', { class: 'tt-row' }, `${e.calls.toLocaleString()} calls · ${fmtRate(e.rate)} req/s`),
          el('div', { class: `tt-row ${e.errs ? 'tt-err' : ''}` }, `${e.errs.toLocaleString()} errors (${fmtPct(e.errRate)})`),
          el('div', { class: 'tt-row mono' }, `avg ${fmtDur(e.avgDurationMicros)} · p95 ${fmtDur(e.p95DurationMicros)}`)]);
      };
      const outE = () => { path.classList.remove('hl'); label.classList.remove('hl'); path.setAttribute('marker-end', `url(#arr-${cls})`); tip.hide(); };
      for (const x of [hit, label]) { x.addEventListener('mouseenter', over); x.addEventListener('mousemove', (ev) => tip.move(ev)); x.addEventListener('mouseleave', outE); }
      edgeLayer.append(path, hit);
      labelLayer.append(label);
    }
    for (const n of nodes) {
      const p = P.get(n);
      const ins = inStats.get(n), outs = outStats.get(n);
      const sub = ins ? `${fmtRate(ins.calls / secs)} req/s in · ${fmtPct(ins.calls ? ins.errs / ins.calls : 0)} err`
        : outs ? 'entry point' : 'no calls observed';
      const errCls = ins && ins.errs ? edgeClass(ins.errs / ins.calls) : 'ok';
      const name = n.length > 24 ? n.slice(0, 23) + '…' : n;
      const go = () => { location.hash = `#/search?service=${encodeURIComponent(n)}&lookback=${MAP_LOOKBACKS.some(([v]) => v === lookback) && lookback !== '7d' ? lookback : '24h'}`; };
      const g = sv('g', { class: `map-node node-${errCls}`, transform: `translate(${p.x},${p.y})`, tabindex: '0', role: 'link',
        'aria-label': `${n}: ${sub}. Open search for this service.`, dataset: { service: n }, style: { '--c': svcColor(n) },
        onclick: go, onkeydown: (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); go(); } },
        onmouseenter: () => edgeEls.forEach((x) => { const on = x.e.parent === n || x.e.child === n; x.path.classList.toggle('dim', !on); x.label.classList.toggle('dim', !on); }),
        onmouseleave: () => edgeEls.forEach((x) => { x.path.classList.remove('dim'); x.label.classList.remove('dim'); }) },
      sv('title', null, `${n} — click to search its traces`),
      sv('rect', { class: 'node-box', width: NW, height: NH, rx: 8 }),
      sv('rect', { class: 'node-stripe', width: 5, height: NH - 16, x: 8, y: 8, rx: 2.5 }),
      sv('text', { class: 'node-name', x: 22, y: 24 }, name),
      sv('text', { class: `node-sub ns-${errCls}`, x: 22, y: 42 }, sub));
      nodeLayer.append(g);
    }
    svg.append(edgeLayer, nodeLayer, labelLayer);
    const notes = [];
    if (!edges.length) notes.push(el('div', { class: 'map-note' }, `No calls between services were observed in the ${MAP_LOOKBACKS.find(([v]) => v === lookback)[1].toLowerCase()}.`));
    canvas.replaceChildren(...notes, el('div', { class: 'map-scroll' }, svg));
    renderTable(edges, secs);
  }

  function renderTable(edges, secs) {
    if (!edges.length) { tableBox.replaceChildren(); return; }
    const sorted = [...edges].sort((a, b) => b.errRate - a.errRate || b.calls - a.calls);
    tableBox.replaceChildren(el('h3', { class: 'section-title' }, 'Edges'),
      el('table', { class: 'data-table card' },
        el('thead', null, el('tr', null, ['Caller', 'Callee', 'Calls', 'Req/s', 'Errors', 'Error rate', 'Avg', 'p95'].map((h, i) => el('th', { class: i >= 2 ? 'num' : null }, h)))),
        el('tbody', null, sorted.map((e) => el('tr', { class: `row-${edgeClass(e.errRate)}` },
          el('td', null, el('a', { href: `#/search?service=${encodeURIComponent(e.parent)}`, class: 'svc-link' }, svcDot(e.parent), e.parent)),
          el('td', null, el('a', { href: `#/search?service=${encodeURIComponent(e.child)}`, class: 'svc-link' }, svcDot(e.child), e.child)),
          el('td', { class: 'num mono' }, e.calls.toLocaleString()),
          el('td', { class: 'num mono' }, fmtRate(e.calls / secs)),
          el('td', { class: 'num mono' }, e.errs.toLocaleString()),
          el('td', { class: `num mono er-${edgeClass(e.errRate)}` }, fmtPct(e.errRate)),
          el('td', { class: 'num mono' }, fmtDur(e.avgDurationMicros)),
          el('td', { class: 'num mono' }, fmtDur(e.p95DurationMicros)))))));
  }

  load();
  return {
    title: 'Service map · tracer',
    update(p) { const lb = p.get('lookback') || '1h'; if (lb !== lookback && MAP_LOOKBACKS.some(([v]) => v === lb)) { lookback = lb; lbSel.value = lb; load(); } },
    destroy() { ctrl.abort(); },
  };
}

// ───────────────────────────── chrome: theme, quick open, help, keys ─────────────────────────────
function initTheme() {
  let saved = null;
  try { saved = localStorage.getItem('tracer.theme'); } catch { /* storage disabled */ }
  if (saved === 'light' || saved === 'dark') document.documentElement.dataset.theme = saved;
}
function toggleTheme() {
  const cur = document.documentElement.dataset.theme ||
    (matchMedia('(prefers-color-scheme: light)').matches ? 'light' : 'dark');
  const next = cur === 'light' ? 'dark' : 'light';
  document.documentElement.dataset.theme = next;
  try { localStorage.setItem('tracer.theme', next); } catch { /* ignore */ }
}

function initQuickOpen() {
  const form = $('#quick-open'), input = $('#quick-open-input');
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const id = input.value.trim().toLowerCase().replace(/^0x/, '');
    if (!/^[0-9a-f]{1,32}$/.test(id)) {
      form.classList.remove('invalid'); void form.offsetWidth; form.classList.add('invalid');
      toast('A trace ID is 1–32 hex characters');
      return;
    }
    input.value = ''; input.blur();
    location.hash = `#/trace/${id}`;
  });
  input.addEventListener('input', () => form.classList.remove('invalid'));
}

const SHORTCUTS = [
  ['Global', [['/', 'Open a trace by ID'], ['g s', 'Go to search'], ['g m', 'Go to service map'], ['t', 'Toggle light/dark theme'], ['?', 'Show this help']]],
  ['Search results', [['j / ↓', 'Next trace'], ['k / ↑', 'Previous trace'], ['Enter', 'Open trace']]],
  ['Trace', [['j / k', 'Next / previous span'], ['Enter / o', 'Toggle span details'], ['← / →', 'Collapse / expand (← again: go to parent)'],
    ['f', 'Find in trace'], ['Esc', 'Close span details'], ['u', 'Back to results']]],
];
function toggleHelp(force) {
  let ov = $('#help-overlay');
  if (ov && force !== true) { ov.remove(); return; }
  if (ov) return;
  ov = el('div', { id: 'help-overlay', class: 'overlay', onclick: (e) => { if (e.target === ov) ov.remove(); } },
    el('div', { class: 'dialog card', role: 'dialog', 'aria-modal': 'true', 'aria-label': 'Keyboard shortcuts' },
      el('div', { class: 'dialog-head' }, el('h2', null, 'Keyboard shortcuts'),
        el('button', { class: 'icon-btn', type: 'button', 'aria-label': 'Close', onclick: () => ov.remove() }, '×')),
      el('div', { class: 'shortcut-grid' }, SHORTCUTS.map(([group, list]) => el('section', null, el('h3', null, group),
        el('dl', null, list.map(([k, d]) => [el('dt', null, k.split(' / ').map((x, i) => [i ? ' / ' : '', x.split(' ').map((y, j) => [j ? ' ' : '', el('kbd', null, y)])])), el('dd', null, d)])))))));
  document.body.append(ov);
  $('.dialog button', ov).focus();
}

let gPending = 0;
function onGlobalKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const t = e.target;
  const typing = t instanceof Element && t.matches('input, textarea, select, [contenteditable=""], [contenteditable="true"]');
  if (e.key === 'Escape') {
    if ($('#help-overlay')) { toggleHelp(); e.preventDefault(); return; }
    if (typing) { t.blur(); return; }
  }
  if (typing || $('#help-overlay')) return;
  if (gPending) {
    clearTimeout(gPending); gPending = 0;
    if (e.key === 's') { location.hash = lastSearchHash; e.preventDefault(); return; }
    if (e.key === 'm') { location.hash = '#/map'; e.preventDefault(); return; }
  }
  if (e.key === 'g') { gPending = setTimeout(() => { gPending = 0; }, 1200); return; }
  if (e.key === '/') { e.preventDefault(); const i = $('#quick-open-input'); i.focus(); i.select(); return; }
  if (e.key === '?') { e.preventDefault(); toggleHelp(); return; }
  if (e.key === 't') { toggleTheme(); return; }
  if (page && page.onKey && page.onKey(e)) e.preventDefault();
}

async function init() {
  initTheme();
  initQuickOpen();
  $('#theme-toggle').addEventListener('click', toggleTheme);
  $('#help-btn').addEventListener('click', () => toggleHelp());
  document.addEventListener('keydown', onGlobalKey);
  window.addEventListener('hashchange', route);
  // Load the service list first so service colours are assigned in a stable order.
  try { await Promise.race([getServices(), new Promise((_, rej) => setTimeout(rej, 3000))]); } catch { /* pages report errors themselves */ }
  route();
}
init();
})();
