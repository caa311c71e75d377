// tunneld inspector: the live list of captured HTTP requests on the agent's web server.
//
// Everything shown comes from the agent's local API (ngrok's shapes): the list from
// GET /api/requests/http, then live additions from the SSE feed /api/requests/http/events.
// Request paths, headers and bodies are attacker-controlled, so no captured text is ever
// parsed as HTML: every node is built with createElement/textContent (see dom.js el()).
// The list keeps a small summary of each request (no raw bytes) and is virtualised, so tens of
// thousands of entries stay responsive; the full request is fetched when it is selected.
import { el, $, toast } from './dom.js';
import { asText, b64ToBytes, bytesToB64, formFields, headerList, latin1, parseMessage } from './message.js';
import { fmtDuration, fmtSize, fmtTime } from './format.js';
import { formatJSON, xmlResult } from './syntax.js';
import { bodyView, decodeContent, hexBlock, kvTable, textBlock } from './bodies.js';
import { FILTER_KEYS, compileFilters, summarize } from './filters.js';
import { curlCommand, harEntry } from './export.js';

const ROW = 24;                 // px, matches --row in app.css
const LIST_LIMIT = 10000;       // how many captured requests the first load asks for
const KEEP = 20000;             // most summaries kept in memory as the feed adds more

// ---------------------------------------------------------------- state

const state = {
  entries: [],          // summaries, newest first
  byId: new Map(),
  view: [],             // entries passing the filters
  filter: compileFilters({}),
  selected: null,       // id
  tunnels: new Map(),   // name -> public_url
  full: new Map(),      // id -> full request object (small cache)
};

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    let msg = `${resp.status} ${resp.statusText}`;
    try {
      const j = await resp.json();
      if (j && j.msg) msg = j.msg + (j.details && Object.keys(j.details).length ? ' ' + JSON.stringify(j.details) : '');
    } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return resp.status === 204 ? null : resp.json();
}

async function fullRequest(id) {
  if (state.full.has(id)) return state.full.get(id);
  const r = await api('GET', '/api/requests/http/' + encodeURIComponent(id));
  state.full.set(id, r);
  if (state.full.size > 50) state.full.delete(state.full.keys().next().value);
  return r;
}

function addRequest(r, live) {
  if (!r || r.id === undefined) return;
  const s = summarize(r);
  const old = state.byId.get(s.id);
  state.full.delete(s.id);
  if (old) {
    Object.assign(old, s);
    rebuildView();
    if (state.selected === s.id) showDetail(s.id);
    return;
  }
  state.byId.set(s.id, s);
  state.entries.unshift(s);
  if (state.entries.length > KEEP) {
    const dropped = state.entries.pop();
    state.byId.delete(dropped.id);
    if (state.view[state.view.length - 1] === dropped) state.view.pop();
  }
  addTunnelOption(s.tunnel);
  if (state.filter.pred(s)) {
    state.view.unshift(s);
    // Keep the rows the user is looking at in place when a new one arrives on top.
    const list = $('#list');
    if (live && list.scrollTop > 0) list.scrollTop += ROW;
  }
  scheduleRender();
  if (s.replayOf && state.selected === s.replayOf) showDetail(s.replayOf);
}

function clearAll() {
  state.entries = [];
  state.byId.clear();
  state.full.clear();
  state.view = [];
  state.selected = null;
  $('#detail').replaceChildren(el('p', { class: 'hint' }, 'Select a request to see it.'));
  scheduleRender();
}

function rebuildView() {
  state.view = state.entries.filter(state.filter.pred);
  scheduleRender();
}

function addTunnelOption(name) {
  if (!name) return;
  const sel = $('#filters select[name=tunnel]');
  if ([...sel.options].some((o) => o.value === name)) return;
  sel.append(el('option', { value: name }, name));
}

// ---------------------------------------------------------------- filters <-> URL

function readFilterForm() {
  const form = $('#filters');
  const values = {};
  for (const k of FILTER_KEYS) values[k] = form.elements[k].value;
  return values;
}

function applyFilters(pushUrl) {
  const values = readFilterForm();
  state.filter = compileFilters(values);
  const form = $('#filters');
  for (const k of FILTER_KEYS) {
    const input = form.elements[k];
    input.classList.toggle('invalid', !!state.filter.errors[k]);
    input.title = state.filter.errors[k] || input.getAttribute('data-title') || '';
  }
  if (pushUrl) {
    const params = new URLSearchParams();
    for (const k of FILTER_KEYS) if (values[k].trim()) params.set(k, values[k].trim());
    const qs = params.toString();
    history.replaceState(null, '', location.pathname + (qs ? '?' + qs : '') + location.hash);
  }
  rebuildView();
}

function loadFiltersFromUrl() {
  const params = new URLSearchParams(location.search);
  const form = $('#filters');
  for (const k of FILTER_KEYS) {
    const v = params.get(k) || '';
    if (k === 'tunnel' && v) addTunnelOption(v);
    form.elements[k].value = v;
  }
}

// ---------------------------------------------------------------- the virtual list

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; renderList(); });
}

function renderList() {
  const list = $('#list');
  const spacer = $('#spacer');
  const n = state.view.length;
  spacer.style.height = n * ROW + 'px';
  const first = Math.max(0, Math.floor(list.scrollTop / ROW) - 5);
  const last = Math.min(n, first + Math.ceil((list.clientHeight || 600) / ROW) + 10);
  const rows = [];
  for (let k = first; k < last; k++) rows.push(listRow(state.view[k], k));
  list.replaceChildren(spacer, ...rows);
  $('#empty').hidden = state.entries.length > 0;
  const total = state.entries.length;
  $('#count').textContent = state.filter.active ? `${n.toLocaleString()} of ${total.toLocaleString()} requests`
    : `${total.toLocaleString()} request${total === 1 ? '' : 's'}`;
  if (state.capped) $('#count').textContent += ` (the newest ${LIST_LIMIT.toLocaleString()} loaded)`;
}

function listRow(s, k) {
  const st = s.status ? String(s.status) : '—';
  const row = el('div', { class: 'row' + (s.id === state.selected ? ' selected' : ''), 'data-id': s.id },
    el('span', { class: 'c-time' }, fmtTime(s.start)),
    el('span', { class: 'c-method' }, s.method),
    el('span', { class: 'c-path', title: s.uri }, s.uri,
      s.replayOf ? el('span', { class: 'tag replay' }, 'replay') : null,
      s.truncated ? el('span', { class: 'tag trunc' }, 'truncated') : null),
    el('span', { class: 'c-status s' + (s.status ? String(s.status)[0] : 'x') }, st),
    el('span', { class: 'c-dur' }, fmtDuration(s.duration)),
    el('span', { class: 'c-size' }, fmtSize(s.respSize)));
  row.style.top = k * ROW + 'px';
  return row;
}

function select(id) {
  state.selected = id;
  history.replaceState(null, '', location.pathname + location.search + (id ? '#' + encodeURIComponent(id) : ''));
  scheduleRender();
  showDetail(id);
}

function moveSelection(delta) {
  const idx = state.view.findIndex((s) => s.id === state.selected);
  const next = Math.max(0, Math.min(state.view.length - 1, idx + delta));
  if (!state.view[next]) return;
  select(state.view[next].id);
  const list = $('#list');
  const top = next * ROW;
  if (top < list.scrollTop) list.scrollTop = top;
  else if (top + ROW > list.scrollTop + list.clientHeight) list.scrollTop = top + ROW - list.clientHeight;
}

// ---------------------------------------------------------------- the detail pane

let detailToken = 0;

async function showDetail(id, compare) {
  const token = ++detailToken;
  const pane = $('#detail');
  let r;
  try {
    r = await fullRequest(id);
  } catch (e) {
    if (token === detailToken) pane.replaceChildren(el('p', { class: 'error' }, `Cannot load request ${id}: ${e.message}`));
    return;
  }
  if (token !== detailToken) return;
  if (compare && r.replay_of) {
    let orig = null;
    let err = '';
    try { orig = await fullRequest(r.replay_of); } catch (e) { err = e.message; }
    if (token !== detailToken) return;
    const left = orig ? await requestView(orig, true) : el('p', { class: 'error' }, `Original ${r.replay_of} is no longer captured (${err})`);
    const right = await requestView(r, true);
    if (token !== detailToken) return;
    pane.replaceChildren(
      el('div', { class: 'actions' }, el('button', { type: 'button', onclick: () => showDetail(id) }, 'Back to the replay alone')),
      el('div', { class: 'compare' }, el('div', { class: 'original' }, el('h2', {}, 'Original'), left),
        el('div', { class: 'replayed' }, el('h2', {}, 'Replay'), right)));
    return;
  }
  const view = await requestView(r, false);
  if (token === detailToken) pane.replaceChildren(view);
}

async function requestView(r, compact) {
  const req = r.request || {};
  const resp = r.response;
  const reqRaw = b64ToBytes(req.raw);
  const reqMsg = parseMessage(reqRaw, req.truncated);
  const root = el('div', { class: 'request', 'data-id': r.id });
  root.append(el('h2', { class: 'req-title' }, `${req.method || ''} ${req.uri || ''}`));
  const replays = state.entries.filter((s) => s.replayOf === String(r.id));
  root.append(el('div', { class: 'meta' },
    el('span', { title: r.start }, new Date(r.start).toLocaleString()),
    el('span', {}, 'duration ' + fmtDuration(r.duration)),
    el('span', {}, 'client ' + (r.remote_addr || '?')),
    el('span', {}, 'tunnel ' + (r.tunnel_name || '?')),
    r.replay_of ? el('span', {}, 'replay of ', el('a', { href: '#', class: 'goto', onclick: (ev) => { ev.preventDefault(); select(r.replay_of); } }, r.replay_of)) : null,
    replays.length ? el('span', {}, `${replays.length} replay${replays.length > 1 ? 's' : ''}: `,
      replays.slice(0, 5).map((s) => el('a', { href: '#', class: 'goto', onclick: (ev) => { ev.preventDefault(); select(s.id); } }, s.id + ' '))) : null));
  if (!compact) {
    root.append(el('div', { class: 'actions' },
      el('button', { type: 'button', class: 'primary', id: 'replay', title: 'Send this request to the upstream again', onclick: () => replay(r).catch((e) => toast('Replay failed: ' + e.message)) }, 'Replay'),
      el('button', { type: 'button', id: 'modify', title: 'Edit and send again', onclick: () => openModify(r, reqMsg) }, 'Modify and replay…'),
      el('button', { type: 'button', id: 'copy-curl', onclick: () => copyCurl(r, reqMsg) }, 'Copy as curl'),
      r.replay_of ? el('button', { type: 'button', id: 'compare', onclick: () => showDetail(String(r.id), true) }, 'Compare with original') : null));
  }
  const uri = req.uri || '';
  const q = uri.indexOf('?');
  const query = q === -1 ? [] : formFields(uri.slice(q + 1));
  root.append(await messageView('Request', req, reqRaw, reqMsg, query));
  if (resp) {
    const respRaw = b64ToBytes(resp.raw);
    root.append(await messageView('Response ' + (resp.status || resp.status_code), resp, respRaw, parseMessage(respRaw, resp.truncated), null));
  } else {
    root.append(el('div', { class: 'msg' }, el('h3', {}, 'Response'), el('div', { class: 'msg-body' }, el('p', { class: 'note' }, 'No response (pending, or the upstream failed)'))));
  }
  return root;
}

async function messageView(title, msg, raw, parsed, query) {
  const headers = headerList(msg, parsed);
  const decoded = await decodeContent(parsed.body, headers);
  const box = el('div', { class: 'msg ' + (query ? 'msg-request' : 'msg-response') });
  const body = el('div', { class: 'msg-body' });
  const tabs = el('span', { class: 'tabs' });
  const views = {
    Summary: () => {
      const parts = [];
      if (query && query.length) parts.push(el('h4', {}, 'Query parameters'), kvTable(query));
      parts.push(el('h4', {}, 'Headers'), kvTable(headers));
      if (parsed.trailers.length) parts.push(el('h4', {}, 'Trailers'), kvTable(parsed.trailers));
      const notes = [parsed.note, decoded.note].filter(Boolean);
      if (msg.truncated) notes.unshift(`Body truncated by the capture limit: ${fmtSize(parsed.body.length)} captured of ${fmtSize(msg.body_size)}`);
      parts.push(el('h4', {}, 'Body' + (msg.body_size !== undefined ? ` (${fmtSize(msg.body_size)})` : '')));
      for (const n of notes) parts.push(el('p', { class: 'note' }, n));
      parts.push(bodyView(decoded.body, headers, decoded.encoded));
      return parts;
    },
    Raw: () => {
      const text = asText(raw);
      if (text !== null) return [textBlock(text)];
      const head = latin1(raw.subarray(0, parsed.headLength));
      return [textBlock(head), el('p', { class: 'note' }, `[${fmtSize(raw.length - parsed.headLength)} of binary data: see Hex]`)];
    },
    Hex: () => [hexBlock(raw)],
  };
  const show = (name) => {
    for (const b of tabs.children) b.classList.toggle('active', b.textContent === name);
    body.replaceChildren(...views[name]());
  };
  for (const name of Object.keys(views)) tabs.append(el('button', { type: 'button', class: 'tab-' + name.toLowerCase(), onclick: () => show(name) }, name));
  box.append(el('h3', {}, title, el('span', { class: 'spacer' }), tabs), body);
  show('Summary');
  return box;
}

// ---------------------------------------------------------------- actions

async function replay(r, modify, tunnel) {
  const payload = { id: String(r.id) };
  if (tunnel) payload.tunnel_name = tunnel;
  if (modify) payload.modify = modify;
  await api('POST', '/api/requests/http', payload);
  toast(modify ? 'Modified request replayed' : 'Replayed');
}

function openModify(r, reqMsg) {
  const dialog = $('#modify-dialog');
  const form = $('#modify-form');
  const req = r.request || {};
  const headers = headerList(req, reqMsg);
  form.elements.method.value = req.method || 'GET';
  form.elements.path.value = req.uri || '/';
  form.elements.headers.value = headers.map(([k, v]) => `${k}: ${v}`).join('\n');
  form.elements.trailers.value = reqMsg.trailers.map(([k, v]) => `${k}: ${v}`).join('\n');
  const text = asText(reqMsg.body);
  form.elements.body.value = text === null ? '' : text;
  form.elements.body.dataset.touched = '';
  $('#modify-body-note').textContent = text === null
    ? `(binary, ${fmtSize(reqMsg.body.length)}: sent as captured unless you type a replacement)`
    : req.truncated ? '(captured truncated: sent as captured unless you edit it)' : '';
  const sel = form.elements.tunnel;
  sel.replaceChildren(...[...new Set([r.tunnel_name, ...state.tunnels.keys()])].filter(Boolean).map((n) => el('option', { value: n }, n)));
  sel.value = r.tunnel_name || '';
  $('#modify-error').textContent = '';
  state.modifying = r;
  dialog.showModal();
  form.elements.method.focus();
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

function parseHeaderLines(text, what) {
  const out = [];
  text.split('\n').forEach((line, n) => {
    line = line.replace(/\r$/, '');
    if (!line.trim()) return;
    const colon = line.indexOf(':');
    const name = colon === -1 ? '' : line.slice(0, colon).trim();
    if (!TOKEN.test(name)) throw new Error(`${what} line ${n + 1}: expected "Name: value"`);
    const value = line.slice(colon + 1).trim();
    if (/[\x00-\x08\x0a-\x1f\x7f]/.test(value)) throw new Error(`${what} line ${n + 1}: control character in the value`);
    if (/[^\x00-\xff]/.test(value)) throw new Error(`${what} line ${n + 1}: HTTP header values are Latin-1 (percent-encode other characters)`);
    out.push([name, value]);
  });
  return out;
}

async function sendModified() {
  const form = $('#modify-form');
  const r = state.modifying;
  const err = $('#modify-error');
  err.textContent = '';
  try {
    const method = form.elements.method.value.trim();
    const path = form.elements.path.value.trim();
    if (!TOKEN.test(method)) throw new Error('method: not a valid HTTP method');
    if (!path.startsWith('/') || /[\s\x00-\x1f\x7f]/.test(path)) throw new Error('path: must start with / and contain no spaces or control characters');
    const modify = {
      method,
      path,
      headers: parseHeaderLines(form.elements.headers.value, 'headers'),
      trailers: parseHeaderLines(form.elements.trailers.value, 'trailers'),
    };
    const b = form.elements.body;
    // Untouched, the original body goes (all of it, even when binary or captured truncated).
    if (b.dataset.touched) modify.body = bytesToB64(new TextEncoder().encode(b.value));
    await replay(r, modify, form.elements.tunnel.value || undefined);
    $('#modify-dialog').close();
  } catch (e) {
    err.textContent = e.message;
  }
}

async function copyCurl(r, reqMsg) {
  const cmd = curlCommand(r, reqMsg, state.tunnels);
  $('#curl-text').value = cmd;
  let note = r.request && r.request.truncated ? 'The captured body was truncated: the command sends only the captured part. ' : '';
  try {
    await navigator.clipboard.writeText(cmd);
    note += 'Copied to the clipboard.';
  } catch (e) {
    note += 'Select the text and copy it (the browser refused clipboard access).';
  }
  $('#curl-note').textContent = note;
  $('#curl-dialog').showModal();
  $('#curl-text').select();
}

// ---------------------------------------------------------------- HAR export

async function exportHar() {
  const data = await api('GET', '/api/requests/http?limit=' + LIST_LIMIT);
  const requests = (data.requests || []).filter((r) => state.filter.pred(summarize(r)));
  const har = {
    log: {
      version: '1.2',
      creator: { name: 'tunneld', version: document.documentElement.dataset.version || '' },
      pages: [],
      entries: requests.slice().reverse().map((r) => harEntry(r, state.tunnels)),   // HAR lists oldest first
    },
  };
  const blob = new Blob([JSON.stringify(har, null, 2)], { type: 'application/json' });
  const a = el('a', { href: URL.createObjectURL(blob), download: 'tunneld-requests.har' });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  toast(`Exported ${requests.length} request${requests.length === 1 ? '' : 's'}`);
}

// ---------------------------------------------------------------- start

async function loadTunnels() {
  try {
    const data = await api('GET', '/api/tunnels');
    for (const t of data.tunnels || []) if (t.public_url) state.tunnels.set(t.name, t.public_url);
  } catch (e) { /* the list still works without public URLs */ }
}

async function loadList() {
  const data = await api('GET', '/api/requests/http?limit=' + LIST_LIMIT);
  const requests = data.requests || [];
  // The API lists newest first; add oldest first so the newest ends on top.
  for (let k = requests.length - 1; k >= 0; k--) {
    const s = summarize(requests[k]);
    if (state.byId.has(s.id)) continue;
    state.byId.set(s.id, s);
    state.entries.push(s);
    addTunnelOption(s.tunnel);
  }
  state.entries.sort((a, b) => b.start - a.start);
  state.capped = requests.length >= LIST_LIMIT;
  rebuildView();
}

function connectFeed() {
  const live = $('#live');
  const es = new EventSource('/api/requests/http/events');
  let lost = false;
  es.addEventListener('open', () => {
    live.textContent = 'live';
    live.className = 'live on';
    // Catch up on what completed while the feed was down.
    if (lost) loadList().catch(() => {});
    lost = false;
  });
  es.addEventListener('error', () => {
    lost = true;
    live.textContent = 'reconnecting…';
    live.className = 'live off';
  });
  es.addEventListener('request', (ev) => {
    try { addRequest(JSON.parse(ev.data), true); } catch (e) { /* a bad event must not stop the feed */ }
  });
  es.addEventListener('clear', () => clearAll());
}

function wire() {
  const form = $('#filters');
  for (const input of form.elements) if (input.title) input.setAttribute('data-title', input.title);
  // Filtering 10,000 summaries takes a few milliseconds: every keystroke applies at once (and
  // the URL always matches what is shown).
  form.addEventListener('input', () => applyFilters(true));
  form.addEventListener('change', () => applyFilters(true));
  form.addEventListener('submit', (ev) => { ev.preventDefault(); applyFilters(true); });
  form.addEventListener('reset', () => setTimeout(() => applyFilters(true), 0));
  const list = $('#list');
  list.addEventListener('scroll', scheduleRender, { passive: true });
  list.addEventListener('click', (ev) => {
    const row = ev.target.closest('.row');
    if (row) select(row.getAttribute('data-id'));
  });
  list.addEventListener('keydown', (ev) => {
    if (ev.key === 'ArrowDown' || ev.key === 'j') { moveSelection(1); ev.preventDefault(); }
    if (ev.key === 'ArrowUp' || ev.key === 'k') { moveSelection(-1); ev.preventDefault(); }
  });
  window.addEventListener('resize', scheduleRender);
  $('#clear').addEventListener('click', async () => {
    if (!confirm('Delete every captured request?')) return;
    try { await api('DELETE', '/api/requests/http'); clearAll(); } catch (e) { toast('Clear failed: ' + e.message); }
  });
  $('#export-har').addEventListener('click', () => exportHar().catch((e) => toast('Export failed: ' + e.message)));
  const modifyForm = $('#modify-form');
  modifyForm.addEventListener('submit', (ev) => { ev.preventDefault(); if (ev.submitter && ev.submitter.value === 'cancel') $('#modify-dialog').close(); else sendModified(); });
  modifyForm.elements.body.addEventListener('input', () => { modifyForm.elements.body.dataset.touched = '1'; });
  $('#curl-dialog form').addEventListener('submit', (ev) => { ev.preventDefault(); $('#curl-dialog').close(); });
}

async function start() {
  wire();
  loadFiltersFromUrl();
  applyFilters(false);
  connectFeed();
  await loadTunnels();
  try {
    await loadList();
  } catch (e) {
    toast('Cannot list requests: ' + e.message);
  }
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (wanted && state.byId.has(wanted)) select(wanted);
  document.body.dataset.ready = '1';
}

// Exposed for tests and debugging (read-only helpers; the page never needs them).
window.tunneldInspector = { state, formatJSON, formatXML: xmlResult, compileFilters, summarize, curlCommand, harEntry };
start();
