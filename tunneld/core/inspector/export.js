// tunneld inspector: a captured request as a curl command, and as a HAR 1.2 entry.

import { asText, b64ToBytes, bytesToB64, formFields, headerList, headerValue, mediaType, parseMessage } from './message.js';

export function shellQuote(s) {
  if (/^[A-Za-z0-9_\-.,:/@%+=]+$/.test(s)) return s;
  // Anything with control characters or non-ASCII bytes: bash's $'...' with escapes.
  if (/[\x00-\x1f\x7f]/.test(s)) {
    return "$'" + s.replace(/[\\']/g, '\\$&').replace(/[\x00-\x1f\x7f]/g, (c) => '\\x' + c.charCodeAt(0).toString(16).padStart(2, '0')) + "'";
  }
  return "'" + s.replace(/'/g, "'\\''") + "'";
}

export function bytesQuote(bytes) {
  const text = asText(bytes);
  if (text !== null) return shellQuote(text);
  let out = "$'";
  for (const b of bytes) {
    out += b >= 32 && b < 127 && b !== 39 && b !== 92 ? String.fromCharCode(b) : '\\x' + b.toString(16).padStart(2, '0');
  }
  return out + "'";
}

export function publicUrl(r, headers, tunnels) {
  const base = tunnels.get(r.tunnel_name);
  if (base && /^https?:/.test(base)) return base.replace(/\/$/, '');
  const host = headerValue(headers, 'host');
  return (String(r.tunnel_name || '').endsWith('(http)') ? 'http://' : 'https://') + host;
}

const SKIP_CURL = new Set(['host', 'content-length', 'transfer-encoding', 'connection', 'x-forwarded-for',
  'x-forwarded-proto', 'x-forwarded-host', 'x-original-host']);

export function curlCommand(r, reqMsg, tunnels) {
  const req = r.request || {};
  const headers = headerList(req, reqMsg);
  const parts = ['curl'];
  if (req.method && req.method !== 'GET') parts.push('-X', shellQuote(req.method));
  parts.push(shellQuote(publicUrl(r, headers, tunnels) + (req.uri || '/')));
  for (const [k, v] of headers) if (!SKIP_CURL.has(k.toLowerCase())) parts.push('-H', shellQuote(`${k}: ${v}`));
  if (reqMsg.body.length) parts.push('--data-binary', bytesQuote(reqMsg.body));
  return parts.join(' ');
}

function harHeaders(list) { return list.map(([name, value]) => ({ name, value })); }

export function harEntry(r, tunnels) {
  const req = r.request || {};
  const resp = r.response;
  const reqMsg = parseMessage(b64ToBytes(req.raw), req.truncated);
  const reqHeaders = headerList(req, reqMsg);
  const uri = req.uri || '/';
  const q = uri.indexOf('?');
  const entry = {
    startedDateTime: new Date(r.start).toISOString(),
    time: (r.duration || 0) / 1e6,
    request: {
      method: req.method || '',
      url: publicUrl(r, reqHeaders, tunnels) + uri,
      httpVersion: req.proto || 'HTTP/1.1',
      cookies: [],
      headers: harHeaders(reqHeaders),
      queryString: q === -1 ? [] : formFields(uri.slice(q + 1)).map(([name, value]) => ({ name, value })),
      headersSize: -1,
      bodySize: typeof req.body_size === 'number' ? req.body_size : reqMsg.body.length,
    },
    response: {
      status: resp ? resp.status_code : 0,
      statusText: resp ? String(resp.status || '').replace(/^\d+\s*/, '') : '',
      httpVersion: resp ? resp.proto || 'HTTP/1.1' : '',
      cookies: [],
      headers: [],
      content: { size: 0, mimeType: '' },
      redirectURL: '',
      headersSize: -1,
      bodySize: -1,
    },
    cache: {},
    timings: { send: 0, wait: (r.duration || 0) / 1e6, receive: 0 },
    comment: r.replay_of ? `replay of ${r.replay_of}` : '',
    _id: String(r.id),
    _tunnelName: r.tunnel_name || '',
    _clientAddress: r.remote_addr || '',
    _replayOf: r.replay_of || null,
  };
  if (reqMsg.body.length) {
    const text = asText(reqMsg.body);
    entry.request.postData = text !== null
      ? { mimeType: headerValue(reqHeaders, 'content-type'), text }
      : { mimeType: headerValue(reqHeaders, 'content-type'), text: bytesToB64(reqMsg.body), _encoding: 'base64' };
    if (mediaType(reqHeaders) === 'application/x-www-form-urlencoded' && text !== null) {
      entry.request.postData.params = formFields(text).map(([name, value]) => ({ name, value }));
    }
  }
  if (resp) {
    const respMsg = parseMessage(b64ToBytes(resp.raw), resp.truncated);
    const headers = headerList(resp, respMsg);
    const text = asText(respMsg.body);
    entry.response.headers = harHeaders(headers);
    entry.response.redirectURL = headerValue(headers, 'location');
    entry.response.bodySize = typeof resp.body_size === 'number' ? resp.body_size : respMsg.body.length;
    entry.response.content = { size: respMsg.body.length, mimeType: headerValue(headers, 'content-type') };
    if (respMsg.body.length) {
      if (text !== null) entry.response.content.text = text;
      else { entry.response.content.text = bytesToB64(respMsg.body); entry.response.content.encoding = 'base64'; }
    }
  }
  return entry;
}
