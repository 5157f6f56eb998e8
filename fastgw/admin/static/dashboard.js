// fastgw live dashboard: reads the admin API of the gateway (same origin) and draws it.
// No framework and no build step: the DOM is built with createElement/textContent only (never
// innerHTML with server data), tables are updated in place, the charts are our own SVG.
'use strict';

const TOKEN_KEY = 'fastgw-admin-token';
const HISTORY_S = 300;           // the charts show the last 5 minutes...
const HISTORY_POINTS = 300;      // ...of one-per-second snapshots
const HISTORY_MINUTES = 5;       // ...that start from the server's one-minute history (GET /history)
const RECONNECT_MS = 2000;
const STALL_MS = 10000;          // no bytes for this long on /events: drop the stream and reconnect
const ANALYTICS_MS = 5000;
const PENDING_MS = 15000;        // give up waiting for a snapshot to show a drain/enable
const DASH = '–';
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (sel, root = document) => root.querySelector(sel);

// --- formatting ------------------------------------------------------------------------------

const numberFormat = (digits) => new Intl.NumberFormat('en-US',
  {minimumFractionDigits: digits, maximumFractionDigits: digits});
const NF0 = numberFormat(0), NF1 = numberFormat(1), NF2 = numberFormat(2);
const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

const fmtInt = (v) => isNum(v) ? NF0.format(v) : DASH;
const fmtRate = (v) => isNum(v) ? NF1.format(v) : DASH;                       // 1,234.5
const fmtMs = (v) => !isNum(v) ? DASH : (v < 1 ? NF2 : v < 1000 ? NF1 : NF0).format(v);
function fmtPct(ratio) {                                                      // 0..1 -> 1.2%
  if (!isNum(ratio)) return DASH;
  const p = ratio * 100;
  return (p === 0 ? '0' : p < 1 ? NF2.format(p) : NF1.format(p)) + '%';
}
function fmtDuration(seconds) {                                               // 3725 -> 1h 2m
  if (!isNum(seconds)) return DASH;
  const s = Math.floor(seconds), d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}
function fmtTime(ts) {                                                        // unix s -> 14:05:12
  if (!isNum(ts)) return DASH;
  const d = new Date(ts * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
}

// --- small DOM helpers -----------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'text') node.textContent = v;
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

// Only touch the DOM when the text changes: keeps selections and the inspector quiet.
function setText(node, text) {
  if (node && node.textContent !== text) node.textContent = text;
}

// A table row with one <td class=NAME> per name; row.c[NAME] is the cell.
function makeRow(names) {
  const row = el('tr');
  row.c = {};
  for (const name of names) row.append(row.c[name] = el('td', {class: name}));
  return row;
}

// A small horizontal bar (0..1) followed by a label, for shares.
function makeBar(cell) {
  const fill = el('span');
  cell.bar = fill;
  cell.label = el('span', {class: 'v'});
  cell.append(el('span', {class: 'bar'}, fill), cell.label);
}
function setBar(cell, ratio, text) {
  cell.bar.style.width = `${Math.max(0, Math.min(1, isNum(ratio) ? ratio : 0)) * 100}%`;
  setText(cell.label, text);
}

// Make `parent` hold one child per item, in order, keyed by data-<attr>. Existing nodes are kept
// and updated, not rebuilt, so a button under the pointer survives the once-a-second refresh.
function syncChildren(parent, items, keyOf, attr, make, update) {
  const old = new Map([...parent.children].map((node) => [node.dataset[attr], node]));
  items.forEach((item, i) => {
    const key = String(keyOf(item));
    let node = old.get(key);
    if (node) old.delete(key);
    else { node = make(key, item); node.dataset[attr] = key; }
    if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
    update(node, item, key);
  });
  for (const node of old.values()) node.remove();
}

function emptyRow(tbody, columns, text) {
  if (!tbody.children.length) tbody.append(el('tr', {class: 'empty'}, el('td', {colspan: columns, text})));
}

// Non-blocking notices, bottom right; they go away by themselves, a click dismisses one.
function notify(message, kind = 'ok') {
  const note = el('div', {class: `notice ${kind}`, text: message});
  note.addEventListener('click', () => note.remove());
  $('#notices').append(note);
  setTimeout(() => note.remove(), kind === 'error' ? 10000 : 5000);
}

// --- the admin token -------------------------------------------------------------------------

let token = sessionStorage.getItem(TOKEN_KEY) || '';
let tokenWait = null;       // while the form is shown: a promise every 401'd request waits on
let tokenResolve = null;

function askToken(message) {
  if (!tokenWait) {
    tokenWait = new Promise((resolve) => { tokenResolve = resolve; });
    setText($('#token-message'), message);
    $('#token-form').hidden = false;
    $('#token').value = '';
    $('#token').focus();
    setConnection('auth');
  }
  return tokenWait;
}

$('#token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  token = $('#token').value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('#token-form').hidden = true;
  const resolve = tokenResolve;
  tokenWait = tokenResolve = null;
  resolve();
});

// fetch() with the token; on 401 ask for the token (once for all waiting requests) and retry.
async function request(path, opts = {}) {
  for (;;) {
    const sent = token;
    const headers = {...(opts.headers || {})};
    if (sent) headers.Authorization = `Bearer ${sent}`;
    const resp = await fetch(path, {...opts, headers, cache: 'no-store'});
    if (resp.status !== 401) return resp;
    if (token !== sent) continue;       // a new token arrived while this one was on its way
    if (sent) { sessionStorage.removeItem(TOKEN_KEY); token = ''; }
    await askToken(sent ? 'The token was refused: enter it again.' : 'This gateway needs its admin token.');
  }
}

// A JSON call; a non-2xx answer throws an Error carrying the server's error.message.
async function api(path, method = 'GET', body = undefined) {
  const opts = {method};
  if (body !== undefined) {
    opts.body = JSON.stringify(body);
    opts.headers = {'Content-Type': 'application/json'};
  }
  const resp = await request(path, opts);
  let data = null;
  try { data = await resp.json(); } catch { /* not JSON: the status says enough */ }
  if (!resp.ok) throw new Error(data?.error?.message || `${method} ${path}: HTTP ${resp.status}`);
  return data;
}

// --- the event stream ------------------------------------------------------------------------

function setConnection(state) {
  const node = $('#connection');
  node.dataset.state = state;
  setText($('.label', node), state === 'auth' ? 'token needed' : state);
}

// EventSource cannot send a header, hence fetch() and our own reading of the SSE framing
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
// lines end in \r\n, \n or \r; "data:" lines add to the event, a blank line dispatches it,
// lines starting with ":" are comments (keep-alives), other fields do not matter here.
async function readEvents(reader, onData, onBytes) {
  const decoder = new TextDecoder();
  let buffer = '';
  let data = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    onBytes();
    buffer += decoder.decode(value, {stream: true});
    let m;
    // a lone "\r" at the very end may be the first half of "\r\n": wait for the next chunk
    while ((m = /\r\n|\r(?!$)|\n/.exec(buffer))) {
      const line = buffer.slice(0, m.index);
      buffer = buffer.slice(m.index + m[0].length);
      if (line === '') {
        if (data.length) onData(data.join('\n'));
        data = [];
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'data') data.push(val);
      }
    }
  }
}

async function connect() {
  const ctl = new AbortController();
  let stall = 0;
  // (not while the token form is up: the request is then waiting for the user, not the server)
  const alive = () => {
    clearTimeout(stall);
    stall = setTimeout(() => (tokenWait ? alive() : ctl.abort()), STALL_MS);
  };
  try {
    alive();
    const resp = await request('/events', {signal: ctl.signal, headers: {Accept: 'text/event-stream'}});
    if (!resp.ok || !resp.body) throw new Error(`/events: HTTP ${resp.status}`);
    alive();
    setConnection('live');
    await readEvents(resp.body.getReader(), onSnapshot, alive);
  } catch { /* the network failed or the stream broke: reconnect below */ }
  clearTimeout(stall);
  ctl.abort();
  setConnection('reconnecting');
  setTimeout(connect, RECONNECT_MS);
}

function onSnapshot(text) {
  let snap;
  try { snap = JSON.parse(text); } catch { return; }   // a torn or foreign event: skip it
  if (snap && typeof snap === 'object') render(snap);
}

// --- rendering one snapshot ------------------------------------------------------------------

const samples = [];        // {ts, rps, err, p50, p95, p99}, oldest first
let snapshots = 0;
const pending = new Map();  // "service/address" -> {drain, until}: a drain/enable on its way

function render(s) {
  const t = s.totals || {};
  // History points (one per minute) that reach past this snapshot give way to the live ones.
  while (samples.length && samples[samples.length - 1].span > 1 && !(s.ts > samples[samples.length - 1].ts)) samples.pop();
  if (samples.length && !(s.ts > samples[samples.length - 1].ts)) samples.length = 0;  // clock went back
  samples.push({ts: s.ts, span: 1, rps: t.rps, err: t.error_rate, p50: t.p50_ms, p95: t.p95_ms, p99: t.p99_ms});
  while (samples.length > HISTORY_POINTS + HISTORY_MINUTES || samples[0].ts < s.ts - HISTORY_S) samples.shift();

  renderHeader(s);
  renderCards(t, s.cache || {});
  renderCharts();
  renderRoutes(s.routes || [], s.unmatched, t);
  renderListeners(s.listeners || []);
  renderServices(s.services || []);
  renderWorkers(s.workers || [], s.config_version);
  renderCache(s.cache || {});
  document.body.dataset.updated = String(s.ts);
  document.body.dataset.snapshots = String(++snapshots);
}

function renderHeader(s) {
  setText($('#version'), s.version || DASH);
  setText($('#uptime'), fmtDuration(s.uptime_s));
  $('#uptime').title = isNum(s.uptime_s) ? `started ${new Date((s.ts - s.uptime_s) * 1000).toLocaleString()}` : '';
  setText($('#config-version'), String(s.config_version ?? DASH));
  const r = s.reload;
  const status = $('#reload-status');
  if (r) {
    setText(status, r.ok ? `reload ok · v${r.version} · ${fmtTime(r.at)}`
                         : `reload failed · ${fmtTime(r.at)} · ${r.error || 'unknown error'}`);
    status.className = `meta ${r.ok ? 'ok' : 'error'}`;
    status.title = r.error || '';
  }
  const workers = s.workers || [];
  const running = workers.filter((w) => w.running).length;
  const count = $('#worker-count');
  setText(count, String(workers.length));
  count.className = running < workers.length ? 'warn' : '';
  count.title = `${running} of ${workers.length} running`;
  setText($('#last-update'), fmtTime(s.ts));
}

// warn/bad classes for an error rate (0..1)
const errorClass = (ratio) => !isNum(ratio) || ratio === 0 ? '' : ratio >= 0.05 ? 'bad' : 'warn';

function renderCards(t, cache) {
  setText($('#total-rps'), fmtRate(t.rps));
  setText($('#total-error-rate'), fmtPct(t.error_rate));
  $('#total-error-rate').className = errorClass(t.error_rate);
  setText($('#p50'), fmtMs(t.p50_ms));
  setText($('#p95'), fmtMs(t.p95_ms));
  setText($('#p99'), fmtMs(t.p99_ms));
  setText($('#cache-hit-ratio'), fmtPct(cache.hit_ratio));
}

// Answers counted per route (since the start): the 4xx an operator tells apart, the other 4xx, 5xx.
const ANSWERS = ['401', '403', '429', '4xx', '5xx'];
const ROUTE_CELLS = ['name', 'service', 'requests', ...ANSWERS.map((a) => `a${a}`), 'rps', 'error-rate',
                     'p50', 'p95', 'p99', 'rate-limited', 'cache'];

// One row: a route, the unmatched requests (404 no_route, their own row so that the rows add up
// to the total) or the total.
function updateRouteRow(row, r) {
  const c = row.c;
  setText(c.requests, fmtInt(r.requests));
  for (const a of ANSWERS) {
    const n = (r.answers || {})[a];
    setText(c[`a${a}`], fmtInt(n));
    c[`a${a}`].className = `a${a} ${n > 0 ? (a === '5xx' ? 'bad' : 'warn') : ''}`;
  }
  setText(c.rps, fmtRate(r.rps));
  setText(c['error-rate'], fmtPct(r.error_rate));
  c['error-rate'].className = `error-rate ${errorClass(r.error_rate)}`;
  setText(c.p50, fmtMs(r.p50_ms));
  setText(c.p95, fmtMs(r.p95_ms));
  setText(c.p99, fmtMs(r.p99_ms));
}

function renderRoutes(routes, unmatched, totals) {
  const tbody = $('#routes tbody');
  // Route names are never empty: "" is the key of the unmatched row.
  const rows = unmatched ? [...routes, {...unmatched, name: ''}] : routes;
  syncChildren(tbody, rows, (r) => r.name, 'route', () => makeRow(ROUTE_CELLS), (row, r) => {
    const c = row.c;
    row.classList.toggle('unmatched', r.name === '');
    setText(c.name, r.name === '' ? 'no route (404)' : r.name);
    setText(c.service, r.service || DASH);
    updateRouteRow(row, r);
    setText(c['rate-limited'], r.name === '' ? DASH : fmtRate(r.rate_limited));
    c['rate-limited'].className = `rate-limited ${r.rate_limited > 0 ? 'warn' : ''}`;
    setText(c.cache, r.name === '' ? DASH : fmtPct(r.cache_hit_ratio));
  });
  emptyRow(tbody, ROUTE_CELLS.length, 'no routes');
  const tfoot = $('#routes tfoot');
  if (!tfoot.firstChild) {
    const row = makeRow(ROUTE_CELLS);
    row.className = 'total';
    setText(row.c.name, 'total');
    tfoot.append(row);
  }
  updateRouteRow(tfoot.firstChild, totals);
}

const LISTENER_CELLS = ['name', 'bind', 'protocol', 'open', 'accepted', 'rejected'];

function renderListeners(listeners) {
  const tbody = $('#listeners tbody');
  syncChildren(tbody, listeners, (l) => l.name, 'listener', () => makeRow(LISTENER_CELLS), (row, l) => {
    const c = row.c;
    setText(c.name, l.name);
    setText(c.bind, l.bind);
    setText(c.protocol, l.protocol);
    setText(c.open, fmtInt(l.open));
    setText(c.accepted, fmtInt(l.accepted));
    setText(c.rejected, fmtInt(l.rejected));
    c.rejected.className = `rejected ${l.rejected > 0 ? 'warn' : ''}`;
  });
  emptyRow(tbody, LISTENER_CELLS.length, 'no listeners');
}

const TARGET_CELLS = ['address', 'health', 'circuit', 'active', 'ewma', 'weight', 'share', 'rps', 'action'];

// One badge per target; draining first (an operator's choice), then the worst of the rest.
function targetState(t) {
  return t.draining ? 'draining' : t.ejected ? 'ejected' : t.healthy === false ? 'unhealthy' : 'healthy';
}

function makeService(name) {
  const section = el('section', {class: 'service'});
  section.head = el('span', {class: 'summary'});
  section.tbody = el('tbody');
  const titles = ['address', 'health', 'circuit', 'active', 'ewma ms', 'weight', 'share', 'req/s', ''];
  const head = el('tr', {}, ...titles.map((h, i) => el('th', {class: i >= 3 && i <= 7 ? 'num' : '', text: h})));
  section.table = el('table', {class: 'targets'}, el('thead', {}, head), section.tbody);
  section.append(el('h3', {}, el('span', {class: 'name', text: name}), section.head), section.table);
  return section;
}

function makeTarget(t, service) {
  const row = makeRow(TARGET_CELLS);
  row.c.health.append(row.badge = el('span', {class: 'badge'}));
  makeBar(row.c.share);
  row.btn = el('button', {type: 'button'});
  row.btn.addEventListener('click', () => toggleDrain(service, t.address, row.btn.className === 'drain', row.btn));
  row.c.action.append(row.btn);
  return row;
}

function renderServices(services) {
  const box = $('#services');
  syncChildren(box, services, (s) => s.name, 'service', makeService, (section, s) => {
    const targets = s.targets || [];
    const healthy = targets.filter((t) => targetState(t) === 'healthy').length;
    const rps = targets.reduce((sum, t) => sum + (isNum(t.rps) ? t.rps : 0), 0);
    // a built-in service (echo) has no targets: no table then
    setText(section.head, targets.length ? `${healthy}/${targets.length} in rotation · ${fmtRate(rps)} req/s`
                                         : 'no targets');
    section.table.hidden = !targets.length;
    syncChildren(section.tbody, targets, (t) => `${s.name}/${t.address}`, 'target',
                 (key, t) => makeTarget(t, s.name), (row, t, key) => updateTarget(row, t, key));
  });
  if (!services.length && !box.children.length) box.append(el('p', {class: 'empty', text: 'no services'}));
}

function updateTarget(row, t, key) {
  const c = row.c;
  const state = targetState(t);
  setText(c.address, t.address);
  setText(row.badge, state);
  row.badge.className = `badge ${state}`;
  row.badge.title = [t.healthy === false ? 'health check failing' : 'health check ok',
                     t.ejected && 'ejected (outlier)', t.draining && 'draining'].filter(Boolean).join(', ');
  row.classList.toggle('draining', !!t.draining);
  setText(c.circuit, t.circuit || DASH);
  c.circuit.className = `circuit ${t.circuit && t.circuit !== 'closed' ? 'bad' : ''}`;
  setText(c.active, fmtInt(t.active));
  setText(c.ewma, fmtMs(t.ewma_ms));
  setText(c.weight, fmtInt(t.weight));
  setBar(c.share, t.share, fmtPct(t.share));
  setText(c.rps, fmtRate(t.rps));
  // The button waits (disabled) until a snapshot shows the state it asked for.
  const wait = pending.get(key);
  if (wait && (wait.drain === !!t.draining || Date.now() > wait.until)) pending.delete(key);
  const kind = t.draining ? 'enable' : 'drain';
  if (row.btn.className !== kind) row.btn.className = kind;
  setText(row.btn, t.draining ? 'Enable' : 'Drain');
  row.btn.title = t.draining ? 'take new requests again' : 'stop sending new requests here';
  row.btn.disabled = pending.has(key);
}

async function toggleDrain(service, address, drain, btn) {
  const key = `${service}/${address}`;
  pending.set(key, {drain, until: Date.now() + PENDING_MS});
  btn.disabled = true;
  try {
    await api(`/services/${encodeURIComponent(service)}/targets/${encodeURIComponent(address)}`,
              'PATCH', {drain});
    notify(`${key}: ${drain ? 'draining' : 'enabled'}`);
  } catch (err) {
    pending.delete(key);
    btn.disabled = false;
    notify(err.message, 'error');
  }
}

const WORKER_CELLS = ['index', 'pid', 'running', 'heartbeat', 'requests', 'restarts', 'config-version'];

function renderWorkers(workers, version) {
  const tbody = $('#workers tbody');
  syncChildren(tbody, workers, (w) => w.index, 'worker', () => {
    const row = makeRow(WORKER_CELLS);
    row.c.running.append(row.badge = el('span', {class: 'badge'}));
    return row;
  }, (row, w) => {
    const c = row.c;
    setText(c.index, String(w.index));
    setText(c.pid, w.pid == null ? DASH : String(w.pid));
    setText(row.badge, w.running ? 'running' : 'stopped');
    row.badge.className = `badge ${w.running ? 'healthy' : 'unhealthy'}`;
    setText(c.heartbeat, isNum(w.heartbeat_age_s) ? `${NF1.format(w.heartbeat_age_s)} s` : DASH);
    c.heartbeat.className = `heartbeat ${w.heartbeat_age_s > 5 ? 'bad' : w.heartbeat_age_s > 2 ? 'warn' : ''}`;
    setText(c.requests, fmtInt(w.requests));
    setText(c.restarts, fmtInt(w.restarts));
    c.restarts.className = `restarts ${w.restarts > 0 ? 'warn' : ''}`;
    setText(c['config-version'], `v${w.config_version ?? DASH}`);
    // a worker still on an older config than the supervisor's
    c['config-version'].className = `config-version ${w.config_version !== version ? 'warn' : ''}`;
  });
  emptyRow(tbody, WORKER_CELLS.length, 'no workers');
}

function renderCache(cache) {
  setText($('#cache-ratio'), fmtPct(cache.hit_ratio));
  setText($('#cache-hits'), fmtRate(cache.hits_per_s));
  setText($('#cache-misses'), fmtRate(cache.misses_per_s));
}

// --- charts ----------------------------------------------------------------------------------

function svg(tag, attrs = {}, text = '') {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

// The smallest round number (1, 1.2, 1.5, 2, ... x 10^n) at or above v: the y axis maximum.
function niceMax(v, floor) {
  if (!(v > floor)) return floor;
  const e = 10 ** Math.floor(Math.log10(v));
  return [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * e).find((m) => m >= v);
}

const PAD = {left: 44, right: 8, top: 8, bottom: 18};
const AXIS = new Intl.NumberFormat('en-US', {maximumFractionDigits: 1});

// Draw `series` ([{key, cls}]) of `samples` into the <svg>: one path per series (broken where a
// value is missing or snapshots stopped), y max label and mid line, a time grid on the minutes.
function drawChart(node, series, {floor, fmt, area = false}) {
  const w = node.clientWidth, h = node.clientHeight;
  if (!w || !h) return;
  node.setAttribute('viewBox', `0 0 ${w} ${h}`);
  const x0 = PAD.left, x1 = w - PAD.right, y0 = h - PAD.bottom, y1 = PAD.top;
  const end = samples.length ? samples[samples.length - 1].ts : Date.now() / 1000;
  const start = end - HISTORY_S;
  const values = samples.flatMap((p) => series.map((s) => p[s.key])).filter(isNum);
  const max = niceMax(Math.max(0, ...values), floor);
  const X = (ts) => x0 + (ts - start) / HISTORY_S * (x1 - x0);
  const Y = (v) => y0 - v / max * (y0 - y1);
  const parts = [];

  // horizontal grid: 0, max/2, max
  for (const v of [0, max / 2, max]) {
    parts.push(svg('line', {class: v ? 'grid' : 'axis', x1: x0, x2: x1, y1: Y(v), y2: Y(v)}));
    parts.push(svg('text', {class: v === max ? 'label ymax' : 'label', x: x0 - 4, y: Y(v) + 3.5,
                            'text-anchor': 'end'}, fmt(v)));
  }
  // vertical grid on whole minutes
  for (let t = Math.ceil(start / 60) * 60; t <= end; t += 60) {
    parts.push(svg('line', {class: 'grid', x1: X(t), x2: X(t), y1, y2: y0}));
    parts.push(svg('text', {class: 'label', x: X(t), y: h - 5, 'text-anchor': 'middle'}, fmtTime(t).slice(0, 5)));
  }
  const pt = ([x, y]) => `${x.toFixed(1)} ${y.toFixed(1)}`;
  for (const s of series) {
    // runs of consecutive points; a missing value or a gap of more than the point's span and
    // 2 s (a reconnect) starts a new run instead of drawing a line across it
    const runs = [];
    samples.forEach((p, i) => {
      if (!isNum(p[s.key])) return;
      if (!runs.length || !isNum(samples[i - 1]?.[s.key]) || p.ts - samples[i - 1].ts > p.span + 2) runs.push([]);
      runs[runs.length - 1].push([X(p.ts), Y(p[s.key])]);
    });
    if (area) {                 // the same runs closed down to the zero line, lightly filled
      const d = runs.map((r) => `M${pt([r[0][0], y0])}L${r.map(pt).join('L')}L${pt([r.at(-1)[0], y0])}Z`);
      parts.push(svg('path', {class: `area ${s.cls}`, d: d.join('') || 'M0 0'}));
    }
    const line = runs.map((r) => `M${r.map(pt).join('L')}`).join('');
    parts.push(svg('path', {class: `series ${s.cls}`, d: line || 'M0 0'}));
    const last = runs.length ? runs[runs.length - 1].at(-1) : null;
    if (last) parts.push(svg('circle', {class: `dot ${s.cls}`, cx: last[0], cy: last[1], r: 2.5}));
  }
  node.replaceChildren(...parts);
  node.dataset.points = String(samples.length);
  node.dataset.historyPoints = String(samples.filter((p) => p.span > 1).length);
  node.dataset.max = String(max);
}

function renderCharts() {
  drawChart($('#rps-chart'), [{key: 'rps', cls: 'rps'}], {floor: 1, area: true, fmt: (v) => AXIS.format(v)});
  drawChart($('#error-chart'), [{key: 'err', cls: 'err'}], {floor: 0.01, area: true,
    fmt: (v) => `${+(v * 100).toFixed(2)}%`});
  drawChart($('#latency-chart'), [{key: 'p99', cls: 'p99'}, {key: 'p95', cls: 'p95'}, {key: 'p50', cls: 'p50'}],
    {floor: 1, fmt: (v) => `${+v.toFixed(2)} ms`});
}

let resizeTimer = 0;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(renderCharts, 100);
});

// --- history: the charts start from the server's minute buckets ------------------------------

// One point per minute of the last five, at the end of what it covers, its rate over the seconds
// it covers: the page is not empty for its first minutes, and live snapshots continue it.
async function loadHistory() {
  try {
    const data = await api(`/history?window=${HISTORY_MINUTES}m`);
    for (const m of data.minutes || []) {
      if (!m.requests && !samples.length) continue;       // nothing yet: no line along zero before it
      // (the server's clock, as the snapshots' `ts`: a skewed browser clock does not matter)
      samples.push({ts: Math.min(m.ts + 60, data.ts), span: 60, rps: m.requests / m.seconds,
                    err: m.requests ? m.errors / m.requests : 0, p50: m.p50_ms, p95: m.p95_ms, p99: m.p99_ms});
    }
    const total = (data.minutes || []).reduce((sum, m) => sum + m.requests, 0);
    document.body.dataset.historyRequests = String(total);
    renderCharts();
  } catch (err) {
    notify(`no history: ${err.message}`, 'error');
  }
}

// --- usage analytics -------------------------------------------------------------------------

const ANALYTICS_CELLS = ['key', 'requests', 'errors', 'error-rate', 'p50', 'p95', 'p99', 'bar'];
let analyticsSeq = 0;       // answers to older requests (the selectors changed since) are dropped

async function loadAnalytics() {
  const by = $('#analytics-by').value, window_ = $('#analytics-window').value;
  const seq = ++analyticsSeq;
  try {
    const data = await api(`/analytics?by=${encodeURIComponent(by)}&window=${encodeURIComponent(window_)}`);
    if (seq === analyticsSeq) renderAnalytics(data || {});
  } catch (err) {
    if (seq === analyticsSeq) setText($('#analytics-status'), `not updated: ${err.message}`);
  }
}

function renderAnalytics(data) {
  const rows = data.rows || [];
  const tbody = $('#analytics-table tbody');
  const top = Math.max(1, ...rows.map((r) => r.requests || 0));
  const total = rows.reduce((sum, r) => sum + (r.requests || 0), 0);
  syncChildren(tbody, rows, (r) => r.key, 'key', () => {
    const row = makeRow(ANALYTICS_CELLS);
    makeBar(row.c.bar);
    return row;
  }, (row, r) => {
    const c = row.c;
    setText(c.key, r.key);
    // "-" are the requests of no identified consumer; the CSS adds a hint after it
    c.key.className = r.key === '-' && data.by === 'consumer' ? 'key anon' : 'key';
    setText(c.requests, fmtInt(r.requests));
    setText(c.errors, fmtInt(r.errors));
    setText(c['error-rate'], fmtPct(r.error_rate));
    c['error-rate'].className = `error-rate ${errorClass(r.error_rate)}`;
    setText(c.p50, fmtMs(r.p50_ms));
    setText(c.p95, fmtMs(r.p95_ms));
    setText(c.p99, fmtMs(r.p99_ms));
    setBar(c.bar, (r.requests || 0) / top, total ? fmtPct((r.requests || 0) / total) : '');
  });
  emptyRow(tbody, ANALYTICS_CELLS.length, 'no requests in this window');
  const minutes = Math.round((data.window_s || 0) / 60);
  const now = fmtTime(Date.now() / 1000);
  setText($('#analytics-status'), `${fmtInt(total)} requests in ${minutes} min · updated ${now}`);
}

// --- actions ---------------------------------------------------------------------------------

$('#reload').addEventListener('click', async (event) => {
  const btn = event.currentTarget;
  btn.disabled = true;
  try {
    const answer = await api('/reload', 'POST');
    notify(`config reloaded · v${answer?.config_version ?? '?'}`);
  } catch (err) {
    notify(`reload failed: ${err.message}`, 'error');
  } finally {
    btn.disabled = false;
  }
});

$('#purge-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const host = $('#purge-host').value.trim();
  const body = {path_prefix: $('#purge-prefix').value.trim() || '/'};
  if (host) body.host = host;
  $('#purge').disabled = true;
  try {
    const answer = await api('/cache/purge', 'POST', body);
    notify(`purged ${answer?.purged ?? 0} entries`);
  } catch (err) {
    notify(`purge failed: ${err.message}`, 'error');
  } finally {
    $('#purge').disabled = false;
  }
});

$('#analytics-by').addEventListener('change', loadAnalytics);
$('#analytics-window').addEventListener('change', loadAnalytics);

// --- start -----------------------------------------------------------------------------------

async function start() {
  // No stored token: probe once, so that a gateway with a token asks for it before anything else
  // (request() shows the form on a 401 and resolves once a token works).
  if (!token) {
    try { await request('/analytics?by=route&window=5m'); } catch { /* down: the stream retries */ }
  }
  await loadHistory();
  connect();
  loadAnalytics();
  // Usage is refreshed while the page is visible (a background tab costs the gateway nothing).
  setInterval(() => { if (!document.hidden && !tokenWait) loadAnalytics(); }, ANALYTICS_MS);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) loadAnalytics(); });
}

start();
