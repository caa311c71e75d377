// tunneld inspector: bytes and HTTP messages as captured (base64 raw → start line, headers, body, trailers).


export function b64ToBytes(b64) {
  if (!b64) return new Uint8Array(0);
  try {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  } catch (e) {
    return new Uint8Array(0);
  }
}

export function bytesToB64(bytes) {
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

export const latin1 = (bytes) => new TextDecoder('latin1').decode(bytes);

/** The UTF-8 text of bytes, or null when they are not text (invalid UTF-8 or NUL bytes). */
export function asText(bytes) {
  if (bytes.indexOf(0) !== -1) return null;
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch (e) {
    return null;
  }
}

export function indexOfSeq(bytes, seq, from) {
  outer: for (let i = from || 0; i <= bytes.length - seq.length; i++) {
    for (let j = 0; j < seq.length; j++) if (bytes[i + j] !== seq[j]) continue outer;
    return i;
  }
  return -1;
}

/**
 * Split a captured message (head + body bytes) into its start line, header list (in wire
 * order, duplicates kept), body and trailers; the body is de-chunked when it was chunked.
 */
export function parseMessage(raw, truncated) {
  const end = indexOfSeq(raw, [13, 10, 13, 10], 0);
  const headEnd = end === -1 ? raw.length : end;
  const lines = latin1(raw.subarray(0, headEnd)).split('\r\n');
  const startLine = lines.shift() || '';
  const headers = [];
  for (const line of lines) {
    const colon = line.indexOf(':');
    if (colon > 0) headers.push([line.slice(0, colon).trim(), line.slice(colon + 1).trim()]);
  }
  let body = end === -1 ? new Uint8Array(0) : raw.subarray(end + 4);
  let trailers = [];
  let note = '';
  const te = headerValue(headers, 'transfer-encoding').toLowerCase();
  if (te.includes('chunked')) {
    const d = dechunk(body);
    body = d.body;
    trailers = d.trailers;
    if (!d.complete) note = truncated ? 'chunked body cut short by the capture limit' : 'malformed chunked body';
  }
  return { startLine, headers, body, trailers, note, headLength: end === -1 ? raw.length : end + 4 };
}

export function dechunk(data) {
  const parts = [];
  let total = 0;
  let i = 0;
  const trailers = [];
  for (;;) {
    const lineEnd = indexOfSeq(data, [13, 10], i);
    if (lineEnd === -1) break;
    const size = parseInt(latin1(data.subarray(i, lineEnd)).split(';')[0].trim(), 16);
    if (Number.isNaN(size) || size < 0) break;
    i = lineEnd + 2;
    if (size === 0) {
      // Trailer section: header lines up to an empty line.
      for (;;) {
        const e = indexOfSeq(data, [13, 10], i);
        if (e === -1 || e === i) break;
        const line = latin1(data.subarray(i, e));
        const colon = line.indexOf(':');
        if (colon > 0) trailers.push([line.slice(0, colon).trim(), line.slice(colon + 1).trim()]);
        i = e + 2;
      }
      return { body: concat(parts, total), trailers, complete: true };
    }
    const chunk = data.subarray(i, Math.min(i + size, data.length));
    parts.push(chunk);
    total += chunk.length;
    if (i + size > data.length) break;
    i += size + 2;
  }
  return { body: concat(parts, total), trailers, complete: false };
}

export function concat(parts, total) {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

export function headerValue(list, name) {
  const lower = name.toLowerCase();
  for (const [k, v] of list) if (k.toLowerCase() === lower) return v;
  return '';
}

/** Headers of an API message: from the raw head (wire order) or else the headers map. */
export function headerList(msg, parsed) {
  if (parsed && parsed.headers.length) return parsed.headers;
  const out = [];
  for (const [k, vs] of Object.entries((msg && msg.headers) || {})) for (const v of vs) out.push([k, v]);
  return out;
}

export function mediaType(headers) {
  return headerValue(headers, 'content-type').split(';')[0].trim().toLowerCase();
}

export function formFields(text) {
  const rows = [];
  for (const [k, v] of new URLSearchParams(text)) rows.push([k, v]);
  return rows;
}
