// tunneld inspector: request summaries and the filter language (path, status, size, duration, header, tunnel).


/** What the list and the filters need of a request (its raw bytes are not kept). */
export function summarize(r) {
  const req = r.request || {};
  const resp = r.response || null;
  const uri = req.uri || '';
  const q = uri.indexOf('?');
  const lower = (h) => {
    const out = new Map();
    for (const [k, vs] of Object.entries(h || {})) out.set(k.toLowerCase(), (vs || []).map(String));
    return out;
  };
  let respSize = -1;
  if (resp) {
    if (typeof resp.body_size === 'number') respSize = resp.body_size;
    else {
      const cl = (resp.headers || {})['Content-Length'];
      respSize = cl ? parseInt(cl[0], 10) : -1;
    }
  }
  return {
    id: String(r.id),
    tunnel: String(r.tunnel_name || ''),
    remote: String(r.remote_addr || ''),
    start: Date.parse(r.start) || 0,
    duration: typeof r.duration === 'number' ? r.duration : null,
    method: String(req.method || ''),
    uri: String(uri),
    path: q === -1 ? uri : uri.slice(0, q),
    status: resp ? resp.status_code || 0 : 0,
    respSize,
    reqHeaders: lower(req.headers),
    respHeaders: resp ? lower(resp.headers) : new Map(),
    replayOf: r.replay_of || null,
    truncated: !!((req && req.truncated) || (resp && resp.truncated)),
  };
}

export const UNITS = { '': 1, b: 1, k: 1024, kb: 1024, m: 1024 ** 2, mb: 1024 ** 2, g: 1024 ** 3, gb: 1024 ** 3 };
export const TIMES = { '': 1e6, ns: 1, us: 1e3, 'µs': 1e3, ms: 1e6, s: 1e9, m: 60e9, min: 60e9 };

/**
 * A numeric filter: comma-separated alternatives, each "N", ">N", ">=N", "<N", "<=N", "!N"
 * or "A-B" (inclusive); N with a unit from `units`.  Throws Error with a message when invalid.
 */
export function numericFilter(text, units, what) {
  const value = (s) => {
    const m = /^(\d+(?:\.\d+)?)\s*([a-zµ]*)$/i.exec(s.trim());
    if (!m || !(m[2].toLowerCase() in units)) throw new Error(`${what}: cannot read ${JSON.stringify(s.trim())}`);
    return parseFloat(m[1]) * units[m[2].toLowerCase()];
  };
  const alts = text.split(',').map((t) => t.trim()).filter(Boolean).map((t) => {
    let m = /^(>=|<=|>|<|=|!=|!)?\s*(.+)$/.exec(t);
    const range = /^([\d.]+\s*[a-zµ]*)\s*(?:-|\.\.)\s*([\d.]+\s*[a-zµ]*)$/i.exec(t);
    if (range) {
      const lo = value(range[1]), hi = value(range[2]);
      return (x) => x >= lo && x <= hi;
    }
    const v = value(m[2]);
    switch (m[1]) {
      case '>': return (x) => x > v;
      case '>=': return (x) => x >= v;
      case '<': return (x) => x < v;
      case '<=': return (x) => x <= v;
      case '!': case '!=': return (x) => x !== v;
      default: return (x) => x === v;
    }
  });
  if (!alts.length) return null;
  return (x) => x !== null && x >= 0 && alts.some((f) => f(x));
}

export function statusFilter(text) {
  const alts = text.split(',').map((t) => t.trim()).filter(Boolean).map((t) => {
    const m = /^([1-5])xx$/i.exec(t);
    if (m) return (x) => Math.floor(x / 100) === +m[1];
    return numericFilter(t, { '': 1 }, 'status');
  });
  if (!alts.length) return null;
  return (x) => x > 0 && alts.some((f) => f(x));
}

export function pathFilter(text) {
  const t = text.trim();
  if (!t) return null;
  if (t.includes('*')) {
    // A glob over the path (no query): * matches within a segment, ** across segments.
    const re = new RegExp('^' + t.split(/(\*\*|\*)/).map((p) =>
      p === '**' ? '.*' : p === '*' ? '[^/]*' : p.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('') + '$');
    return (s) => re.test(s.path);
  }
  return (s) => s.uri.includes(t);
}

export function headerFilter(text) {
  const terms = text.split(';').map((t) => t.trim()).filter(Boolean).map((t) => {
    const colon = t.indexOf(':');
    const name = (colon === -1 ? t : t.slice(0, colon)).trim().toLowerCase();
    const want = colon === -1 ? null : t.slice(colon + 1).trim().toLowerCase();
    if (!/^[!#$%&'*+\-.^_`|~0-9a-z]+$/.test(name)) throw new Error(`header: ${JSON.stringify(name)} is not a header name`);
    return (s) => {
      for (const map of [s.reqHeaders, s.respHeaders]) {
        const vs = map.get(name);
        if (vs && (want === null || vs.some((v) => v.toLowerCase().includes(want)))) return true;
      }
      return false;
    };
  });
  if (!terms.length) return null;
  return (s) => terms.every((f) => f(s));
}

export const FILTER_KEYS = ['path', 'status', 'size', 'duration', 'header', 'tunnel'];

/** Compile the filter values into one predicate (AND of the fields); errors by field. */
export function compileFilters(values) {
  const preds = [];
  const errors = {};
  const add = (key, make) => {
    const text = values[key] || '';
    if (!text.trim()) return;
    try {
      const p = make(text);
      if (p) preds.push(p);
    } catch (e) {
      errors[key] = e.message;
    }
  };
  add('path', (t) => pathFilter(t));
  add('status', (t) => { const f = statusFilter(t); return f && ((s) => f(s.status)); });
  add('size', (t) => { const f = numericFilter(t, UNITS, 'size'); return f && ((s) => f(s.respSize)); });
  add('duration', (t) => { const f = numericFilter(t, TIMES, 'duration'); return f && ((s) => f(s.duration)); });
  add('header', (t) => headerFilter(t));
  add('tunnel', (t) => (s) => s.tunnel === t);
  return { pred: (s) => preds.every((p) => p(s)), errors, active: preds.length > 0 };
}
