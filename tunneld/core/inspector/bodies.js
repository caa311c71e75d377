// tunneld inspector: body views (pretty JSON/XML, form fields, text, hex) built as DOM nodes.

import { el } from './dom.js';
import { asText, concat, formFields, headerValue, indexOfSeq, mediaType, parseMessage } from './message.js';
import { fmtSize } from './format.js';
import { formatJSON, lineCol, xmlResult } from './syntax.js';

const HEX_PAGE = 16 * 1024;     // bytes shown in a hex dump before "show all"
const TEXT_CAP = 512 * 1024;    // characters rendered in one text view before "show all"
const HIGHLIGHT_CAP = 200000;   // larger pretty-printed bodies are shown without colours

export function renderPieces(pieces) {
  const pre = el('pre', { class: 'pretty' });
  const total = pieces.reduce((n, p) => n + p[1].length, 0);
  if (total > HIGHLIGHT_CAP) {
    pre.textContent = pieces.map((p) => p[1]).join('');
    return pre;
  }
  for (const [cls, text] of pieces) pre.append(cls ? el('span', { class: cls }, text) : document.createTextNode(text));
  return pre;
}

/** The text with the character at pos marked as the error. */
export function renderWithError(text, pos, message) {
  const { line, col } = lineCol(text, pos);
  const wrap = el('div', { class: 'syntax-error' });
  wrap.append(el('p', { class: 'error' }, `${message} (line ${line}, column ${col})`));
  const pre = el('pre', { class: 'raw-body' });
  const at = Math.min(pos, text.length);
  pre.append(text.slice(Math.max(0, at - TEXT_CAP), at));
  pre.append(el('mark', { class: 'err', title: message }, at < text.length ? text[at] : '⏎ end of input'));
  pre.append(text.slice(at + 1, at + 1 + TEXT_CAP));
  wrap.append(pre);
  return wrap;
}


export const isJSONType = (t) => t === 'application/json' || t.endsWith('+json') || t === 'text/json';
export const isXMLType = (t) => t === 'application/xml' || t === 'text/xml' || t.endsWith('+xml');

export function textBlock(text) {
  const pre = el('pre', { class: 'raw-body' });
  if (text.length <= TEXT_CAP) {
    pre.textContent = text;
    return pre;
  }
  pre.textContent = text.slice(0, TEXT_CAP);
  const more = el('button', { type: 'button', text: `Show all ${text.length.toLocaleString()} characters` });
  more.addEventListener('click', () => { pre.textContent = text; more.remove(); });
  return el('div', {}, pre, more);
}

export function hexDump(bytes, limit) {
  const lines = [];
  const n = Math.min(bytes.length, limit);
  for (let off = 0; off < n; off += 16) {
    const row = bytes.subarray(off, Math.min(off + 16, n));
    let hex = '';
    let asc = '';
    for (let k = 0; k < 16; k++) {
      if (k < row.length) {
        hex += row[k].toString(16).padStart(2, '0') + ' ';
        asc += row[k] >= 32 && row[k] < 127 ? String.fromCharCode(row[k]) : '.';
      } else hex += '   ';
      if (k === 7) hex += ' ';
    }
    lines.push(off.toString(16).padStart(8, '0') + '  ' + hex + ' |' + asc + '|');
  }
  return lines.join('\n');
}

export function hexBlock(bytes) {
  const pre = el('pre', { class: 'hex' }, hexDump(bytes, HEX_PAGE));
  if (bytes.length <= HEX_PAGE) return pre;
  const more = el('button', { type: 'button', text: `Show all ${bytes.length.toLocaleString()} bytes` });
  more.addEventListener('click', () => { pre.textContent = hexDump(bytes, bytes.length); more.remove(); });
  return el('div', {}, pre, more);
}

export function kvTable(rows) {
  return el('table', { class: 'kv' }, rows.map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', {}, v))));
}


/** multipart/form-data parts as [name, description] rows (null when it does not parse). */
export function multipartFields(bytes, contentType) {
  const m = /boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType);
  if (!m) return null;
  const delim = new TextEncoder().encode('--' + (m[1] || m[2]));
  const rows = [];
  let at = indexOfSeq(bytes, delim, 0);
  while (at !== -1) {
    let start = at + delim.length;
    if (bytes[start] === 45 && bytes[start + 1] === 45) break;   // closing "--"
    start += 2;
    const next = indexOfSeq(bytes, delim, start);
    const part = bytes.subarray(start, next === -1 ? bytes.length : Math.max(start, next - 2));
    const p = parseMessage(concat([new TextEncoder().encode('X\r\n'), part], part.length + 3), false);
    const disp = headerValue(p.headers, 'content-disposition');
    const name = (/\bname="([^"]*)"/.exec(disp) || [])[1] || '(unnamed)';
    const file = (/filename="([^"]*)"/.exec(disp) || [])[1];
    const text = asText(p.body);
    let desc;
    if (file !== undefined) desc = `file ${JSON.stringify(file)} (${headerValue(p.headers, 'content-type') || 'no type'}, ${fmtSize(p.body.length)})`;
    else desc = text !== null ? text : `binary, ${fmtSize(p.body.length)}`;
    rows.push([name, desc]);
    at = next;
  }
  return rows;
}

export async function decodeContent(body, headers) {
  const enc = headerValue(headers, 'content-encoding').toLowerCase().trim();
  if (!enc || enc === 'identity' || !body.length) return { body, note: '' };
  const formats = { gzip: 'gzip', 'x-gzip': 'gzip', deflate: 'deflate' };
  if (!formats[enc] || typeof DecompressionStream === 'undefined') {
    return { body, note: `content-encoding ${enc}: shown as received`, encoded: true };
  }
  try {
    const stream = new Blob([body]).stream().pipeThrough(new DecompressionStream(formats[enc]));
    const out = new Uint8Array(await new Response(stream).arrayBuffer());
    return { body: out, note: `decoded from ${enc} (${fmtSize(body.length)} on the wire)` };
  } catch (e) {
    return { body, note: `content-encoding ${enc}: could not decode (${e.message || e}), shown as received`, encoded: true };
  }
}

/** The parsed view of a body: JSON/XML pretty-printed, forms as fields, text, or hex. */
export function bodyView(bytes, headers, encoded) {
  const type = mediaType(headers);
  const ct = headerValue(headers, 'content-type');
  if (!bytes.length) return el('p', { class: 'note' }, 'No body');
  if (type === 'multipart/form-data' && !encoded) {
    // Parts may be binary (file uploads): parsed from the bytes, before any text check.
    const rows = multipartFields(bytes, ct);
    if (rows && rows.length) return el('div', { class: 'form' }, el('h4', {}, 'Form parts'), kvTable(rows));
  }
  const text = encoded ? null : asText(bytes);
  if (text === null) {
    return el('div', { class: 'binary' },
      el('p', { class: 'note' }, `Binary body, ${fmtSize(bytes.length)}${type ? ' (' + type + ')' : ''}`),
      hexBlock(bytes));
  }
  const trimmed = text.trimStart();
  if (isJSONType(type) || (!type && /^[{[]/.test(trimmed))) {
    const r = formatJSON(text);
    if (r.pieces) return el('div', { class: 'json' }, renderPieces(r.pieces));
    if (isJSONType(type)) return el('div', { class: 'json invalid' }, renderWithError(text, r.pos, 'Invalid JSON: ' + r.error));
  }
  if (isXMLType(type) || (!type && trimmed.startsWith('<?xml'))) {
    const r = xmlResult(text);
    if (r.pieces) return el('div', { class: 'xml' }, renderPieces(r.pieces));
    return el('div', { class: 'xml invalid' }, renderWithError(text, r.pos, 'Invalid XML: ' + r.error));
  }
  if (type === 'application/x-www-form-urlencoded') {
    return el('div', { class: 'form' }, el('h4', {}, 'Form fields'), kvTable(formFields(text)));
  }
  return textBlock(text);
}
