// tunneld inspector: JSON and XML checked and pretty-printed, with the position of a syntax error.
// Pure functions (no DOM): they return [[cssClass, text], ...] pieces or {error, pos}.


/**
 * Check and pretty-print JSON without JSON.parse: the original number and string literals are
 * kept as written, and a syntax error reports its exact offset on every browser.
 * Returns {pieces: [[cls, text]...]} or {error, pos}.
 */
export function formatJSON(s) {
  let i = 0;
  const out = [];
  const fail = (msg, at) => { throw { jsonError: msg, pos: at === undefined ? i : at }; };
  const ws = () => { while (i < s.length && ' \t\n\r'.includes(s[i])) i++; };
  const nl = (d) => out.push(['', '\n' + '  '.repeat(d)]);
  const num = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
  function str(cls) {
    const start = i++;
    while (i < s.length) {
      const c = s[i];
      if (c === '"') { i++; out.push([cls, s.slice(start, i)]); return; }
      if (c === '\\') {
        const e = s[i + 1];
        if (e !== undefined && '"\\/bfnrt'.includes(e)) i += 2;
        else if (e === 'u' && /^[0-9a-fA-F]{4}$/.test(s.substr(i + 2, 4))) i += 6;
        else fail('invalid escape in string');
        continue;
      }
      if (c < ' ') fail('control character in string');
      i++;
    }
    fail('unterminated string', start);
  }
  function container(d, open, close, member) {
    i++;
    out.push(['j-p', open]);
    ws();
    if (s[i] === close) { i++; out.push(['j-p', close]); return; }
    for (;;) {
      nl(d + 1);
      member(d + 1);
      ws();
      if (s[i] === ',') { i++; out.push(['j-p', ',']); ws(); continue; }
      if (s[i] === close) { i++; nl(d); out.push(['j-p', close]); return; }
      fail(i >= s.length ? 'unexpected end of input' : `expected ',' or '${close}'`);
    }
  }
  function value(d) {
    ws();
    if (d > 500) fail('nested too deeply');
    const c = s[i];
    if (c === '{') {
      return container(d, '{', '}', (dd) => {
        ws();
        if (s[i] !== '"') fail(i >= s.length ? 'unexpected end of input' : 'expected a string key');
        str('j-k');
        ws();
        if (s[i] !== ':') fail("expected ':'");
        i++;
        out.push(['j-p', ': ']);
        value(dd);
      });
    }
    if (c === '[') return container(d, '[', ']', (dd) => value(dd));
    if (c === '"') return str('j-s');
    num.lastIndex = i;
    const m = num.exec(s);
    if (m && m[0].length && m[0] !== '-') { i += m[0].length; out.push(['j-n', m[0]]); return; }
    for (const lit of ['true', 'false', 'null']) {
      if (s.startsWith(lit, i)) { i += lit.length; out.push(['j-l', lit]); return; }
    }
    fail(i >= s.length ? 'unexpected end of input' : `unexpected character ${JSON.stringify(c)}`);
  }
  try {
    value(0);
    ws();
    if (i < s.length) fail('unexpected data after the JSON value');
    return { pieces: out };
  } catch (e) {
    if (e && e.jsonError) return { error: e.jsonError, pos: e.pos };
    throw e;
  }
}

export function lineCol(text, pos) {
  let line = 1, col = 1;
  for (let k = 0; k < pos && k < text.length; k++) {
    if (text[k] === '\n') { line++; col = 1; } else col++;
  }
  return { line, col };
}

/**
 * Check XML for well-formedness and pretty-print it, keeping attribute values, text and
 * entity references as written.  Our own reader rather than DOMParser: it gives the exact
 * offset of an error on every browser, and Chromium's parser-error document carries inline
 * styles that the page's Content-Security-Policy (rightly) reports.
 * Returns {pieces} or {error, pos}.
 */
export function formatXML(s) {
  let i = s.charCodeAt(0) === 0xfeff ? 1 : 0;
  const items = [];   // {kind: start|end|empty|text|misc, depth, pieces}
  const stack = [];
  let root = false;
  let doctype = false;
  const fail = (msg, at) => { throw { xmlError: msg, pos: at === undefined ? i : at }; };
  const NAME = /[A-Za-z_:\u00C0-\uFFFF][\w.\-:\u00B7\u00C0-\uFFFF]*/y;
  const name = () => {
    NAME.lastIndex = i;
    const m = NAME.exec(s);
    if (!m) fail(i >= s.length ? 'unexpected end of input' : 'expected a name');
    i += m[0].length;
    return m[0];
  };
  const ws = () => { while (i < s.length && ' \t\r\n'.includes(s[i])) i++; };
  const REF = /&(?:#[0-9]+|#x[0-9a-fA-F]+|([A-Za-z_:][\w.\-:]*));/y;
  const refs = (text, at) => {
    for (let k = text.indexOf('&'); k !== -1; k = text.indexOf('&', k + 1)) {
      REF.lastIndex = k;
      const m = REF.exec(text);
      if (!m) fail("'&' that starts no entity reference (write &amp;)", at + k);
      if (m[1] && !doctype && !['amp', 'lt', 'gt', 'quot', 'apos'].includes(m[1])) fail(`undefined entity &${m[1]};`, at + k);
    }
  };
  const until = (end, what) => {
    const e = s.indexOf(end, i);
    if (e === -1) fail(`unterminated ${what}`);
    const text = s.slice(i, e + end.length);
    i = e + end.length;
    return text;
  };
  while (i < s.length) {
    const at = i;
    if (s[i] !== '<') {
      let e = s.indexOf('<', i);
      if (e === -1) e = s.length;
      const text = s.slice(i, e);
      if (!stack.length && text.trim()) {
        fail(root ? 'text after the root element' : 'text before the root element', i + text.length - text.trimStart().length);
      }
      const cd = text.indexOf(']]>');
      if (cd !== -1) fail("']]>' in text", i + cd);
      refs(text, i);
      if (text.trim()) items.push({ kind: 'text', depth: stack.length, pieces: [['', text.trim()]] });
      i = e;
    } else if (s.startsWith('<?', i)) {
      const pi = until('?>', 'processing instruction');
      if (/^<\?xml[\s?]/i.test(pi) && at > (s.charCodeAt(0) === 0xfeff ? 1 : 0)) fail('XML declaration not at the start', at);
      items.push({ kind: 'misc', depth: stack.length, pieces: [['x-c', pi]] });
    } else if (s.startsWith('<!--', i)) {
      items.push({ kind: 'misc', depth: stack.length, pieces: [['x-c', until('-->', 'comment')]] });
    } else if (s.startsWith('<![CDATA[', i)) {
      if (!stack.length) fail('CDATA outside the root element');
      items.push({ kind: 'text', depth: stack.length, pieces: [['x-c', until(']]>', 'CDATA section')]] });
    } else if (s.startsWith('<!DOCTYPE', i)) {
      if (root) fail('DOCTYPE after the root element');
      let depth = 0;
      for (i += 9; i < s.length; i++) {
        if (s[i] === '[') depth++;
        else if (s[i] === ']') depth--;
        else if (s[i] === '>' && depth <= 0) break;
      }
      if (i >= s.length) fail('unterminated DOCTYPE');
      i++;
      doctype = true;
      items.push({ kind: 'misc', depth: 0, pieces: [['x-c', s.slice(at, i)]] });
    } else if (s[i + 1] === '/') {
      i += 2;
      const n = name();
      ws();
      if (s[i] !== '>') fail(i >= s.length ? 'unexpected end of input' : "expected '>'");
      i++;
      const open = stack.pop();
      if (!open) fail(`closing tag </${n}> with no element open`, at);
      if (open !== n) fail(`closing tag </${n}> does not match <${open}>`, at);
      items.push({ kind: 'end', depth: stack.length, pieces: [['x-t', `</${n}>`]] });
    } else {
      i++;
      if (root && !stack.length) fail('a second root element', at);
      const n = name();
      const pieces = [['x-t', '<' + n]];
      const seen = new Set();
      for (;;) {
        const before = i;
        ws();
        if (i >= s.length) fail('unexpected end of input');
        if (s[i] === '>' || s.startsWith('/>', i)) break;
        if (i === before) fail("expected whitespace, '>' or '/>'");
        const an = name();
        if (seen.has(an)) fail(`duplicate attribute ${an}`, i - an.length);
        seen.add(an);
        ws();
        if (s[i] !== '=') fail("expected '=' after the attribute name");
        i++;
        ws();
        const q = s[i];
        if (q !== '"' && q !== "'") fail('expected a quoted attribute value');
        const e = s.indexOf(q, i + 1);
        if (e === -1) fail('unterminated attribute value');
        const v = s.slice(i + 1, e);
        if (v.indexOf('<') !== -1) fail("'<' in an attribute value", i + 1 + v.indexOf('<'));
        refs(v, i + 1);
        pieces.push(['', ' '], ['x-a', an], ['', '='], ['x-v', s.slice(i, e + 1)]);
        i = e + 1;
      }
      const empty = s[i] === '/';
      i += empty ? 2 : 1;
      pieces.push(['x-t', empty ? '/>' : '>']);
      items.push({ kind: empty ? 'empty' : 'start', depth: stack.length, pieces });
      root = true;
      if (!empty) stack.push(n);
    }
  }
  if (stack.length) fail(`unexpected end of input: <${stack[stack.length - 1]}> is not closed`, s.length);
  if (!root) fail('no root element', s.length);
  // Layout: one item a line, indented; an element holding only text stays on one line.
  const out = [];
  const line = (depth, pieces) => {
    if (out.length) out.push(['', '\n']);
    out.push(['', '  '.repeat(depth)], ...pieces);
  };
  for (let k = 0; k < items.length; k++) {
    const it = items[k];
    const a = items[k + 1];
    const b = items[k + 2];
    if (it.kind === 'start' && a && a.kind === 'text' && b && b.kind === 'end') {
      line(it.depth, [...it.pieces, ...a.pieces, ...b.pieces]);
      k += 2;
    } else if (it.kind === 'start' && a && a.kind === 'end') {
      line(it.depth, [...it.pieces, ...a.pieces]);
      k += 1;
    } else line(it.depth, it.pieces);
  }
  return { pieces: out };
}

export function xmlResult(s) {
  try {
    return formatXML(s);
  } catch (e) {
    if (e && e.xmlError) return { error: e.xmlError, pos: e.pos };
    throw e;
  }
}
