/* Compiled fast path for the HTTP/1 head parsers in _wire.py (optional; pure Python otherwise).
 *
 * scan_request() and scan_response() read the common, simple shape of a head in one pass and
 * answer the parsed fields, or None for anything outside that shape, which the full parser in
 * _wire.py (llhttp's strict mode plus tunneld's own checks) then takes.  The fast path accepts
 * a strict subset of what the full parser accepts and answers the same fields for it: every
 * character class here is narrower than RFC 9110/9112 allow, and every header that changes the
 * framing or the connection is either read in its one plain form (a single Content-Length of
 * digits, a single "Transfer-Encoding: chunked", a single "Connection: close|keep-alive", one
 * Host of plain labels) or sends the head to the full parser (Upgrade, Proxy-Connection,
 * Expect, anything repeated, unusual or malformed).  tests/plugins/test_wire_speedups.py holds
 * the two to that, head by head, on generated and mutated input.
 *
 * Why: per relayed request the edge and the agent parse a request and a response head each;
 * through httptools' callbacks and the checks around them that was ~3.5 us per head in a loop
 * and several times that amid the relay's other work.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Body kinds: the values of _wire.BodyKind. */
#define BODY_NONE 0
#define BODY_LENGTH 1
#define BODY_CHUNKED 2
#define BODY_UNTIL_CLOSE 3

/* tchar (RFC 9110 5.6.2). */
static unsigned char is_tchar[256];
/* Request target characters of the fast path: unreserved, sub-delims, ":@/?%" (RFC 3986);
 * no "#" (a fragment is refused by the full parser) and nothing a URI may not hold. */
static unsigned char is_target[256];
/* Field value and reason phrase characters of the fast path: HTAB, SP and VCHAR (no obs-text). */
static unsigned char is_vchar_ws[256];
/* reg-name label characters of the fast path (a subset of the full parser's _HOST). */
static unsigned char is_label[256];

static PyObject *method_objs[7];
static const char *const method_names[7] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"};
static PyObject *v10, *v11;

static void
init_tables(void)
{
    const char *tspecial = "!#$%&'*+-.^_`|~";
    const char *tgt = "-._~!$&'()*+,;=:@/?%";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        is_tchar[c] = alnum || (c && strchr(tspecial, c) != NULL);
        is_target[c] = alnum || (c && strchr(tgt, c) != NULL);
        is_vchar_ws[c] = c == '\t' || (c >= 0x20 && c <= 0x7e);
        is_label[c] = alnum || c == '-' || c == '_';
    }
}

static inline int
lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

/* Whether p[0:n] equals the lower-case ASCII name, ignoring case. */
static int
name_is(const unsigned char *p, Py_ssize_t n, const char *name)
{
    Py_ssize_t len = (Py_ssize_t)strlen(name);
    if (n != len)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower(p[i]) != (unsigned char)name[i])
            return 0;
    return 1;
}

/* What the header lines said, as far as the fast path reads them. */
struct fields {
    int simple;            /* 0: leave the head to the full parser */
    int n_host, n_length, n_te, n_connection;
    const unsigned char *host;
    Py_ssize_t host_len;
    long long length;
    int close, keep_alive; /* the Connection token */
};

/* Trim SP from both ends of p[0:*n]; returns the new start.  Only SP: llhttp does not read
 * "chunked<HTAB>" as chunked, and a value with a tab next to it is left to the full parser. */
static const unsigned char *
trim(const unsigned char *p, Py_ssize_t *n)
{
    while (*n && p[0] == ' ') {
        p++;
        (*n)--;
    }
    while (*n && p[*n - 1] == ' ')
        (*n)--;
    return p;
}

/* One header line's name and value (value untrimmed); updates f, clearing f->simple to bail. */
static void
header(struct fields *f, const unsigned char *name, Py_ssize_t nlen, const unsigned char *value,
       Py_ssize_t vlen, int request)
{
    /* Every name that llhttp or _wire.py treats specially is matched here; any other header
     * is passed through unread.  Lengths first: most headers match none of them. */
    switch (nlen) {
    case 4:
        if (request && name_is(name, nlen, "host")) {
            f->host = trim(value, &vlen);
            f->host_len = vlen;
            f->n_host++;
        }
        return;
    case 6:
        if (request && name_is(name, nlen, "expect"))
            f->simple = 0;
        return;
    case 7:
        if (name_is(name, nlen, "upgrade"))
            f->simple = 0;
        return;
    case 10:
        if (name_is(name, nlen, "connection")) {
            value = trim(value, &vlen);
            f->n_connection++;
            if (name_is(value, vlen, "close"))
                f->close = 1;
            else if (name_is(value, vlen, "keep-alive"))
                f->keep_alive = 1;
            else
                f->simple = 0;
        }
        return;
    case 14:
        if (name_is(name, nlen, "content-length")) {
            value = trim(value, &vlen);
            f->n_length++;
            if (vlen < 1 || vlen > 18) {
                f->simple = 0;
                return;
            }
            long long n = 0;
            for (Py_ssize_t i = 0; i < vlen; i++) {
                if (value[i] < '0' || value[i] > '9') {
                    f->simple = 0;
                    return;
                }
                n = n * 10 + (value[i] - '0');
            }
            f->length = n;
        }
        return;
    case 16:
        if (name_is(name, nlen, "proxy-connection"))
            f->simple = 0;
        return;
    case 17:
        if (name_is(name, nlen, "transfer-encoding")) {
            value = trim(value, &vlen);
            f->n_te++;
            if (!name_is(value, vlen, "chunked"))
                f->simple = 0;
        }
        return;
    default:
        return;
    }
}

/* Read the header lines from p[i]; the fields, or f.simple == 0.  The head must end right
 * after the blank line. */
static void
header_lines(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, struct fields *f, int request)
{
    memset(f, 0, sizeof(*f));
    f->simple = 1;
    while (f->simple) {
        if (i + 1 < n && p[i] == '\r' && p[i + 1] == '\n') {
            if (i + 2 != n)
                f->simple = 0;
            return;
        }
        Py_ssize_t start = i;
        while (i < n && is_tchar[p[i]])
            i++;
        if (i == start || i >= n || p[i] != ':') {
            f->simple = 0;
            return;
        }
        Py_ssize_t name_end = i++;
        Py_ssize_t vstart = i;
        while (i < n && is_vchar_ws[p[i]])
            i++;
        if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n') {
            f->simple = 0;
            return;
        }
        header(f, p + start, name_end - start, p + vstart, i - vstart, request);
        i += 2;
    }
}

/* Host = labels of [A-Za-z0-9_-] joined by single dots, at most one trailing dot, then an
 * optional ":" and 1-5 digits up to 65535. */
static int
simple_host(const unsigned char *h, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (;;) {
        Py_ssize_t start = i;
        while (i < n && is_label[h[i]])
            i++;
        if (i == start)
            return 0;
        if (i < n && h[i] == '.') {
            i++;
            if (i == n || h[i] == ':')
                break; /* a trailing dot */
            continue;
        }
        break;
    }
    if (i == n)
        return 1;
    if (h[i] != ':')
        return 0;
    i++;
    Py_ssize_t digits = n - i;
    if (digits < 1 || digits > 5)
        return 0;
    long port = 0;
    for (; i < n; i++) {
        if (h[i] < '0' || h[i] > '9')
            return 0;
        port = port * 10 + (h[i] - '0');
    }
    return port <= 65535;
}

/* "HTTP/1.1" or "HTTP/1.0" at p: 11, 10, or 0 for anything else. */
static int
version_at(const unsigned char *p, Py_ssize_t avail)
{
    if (avail < 8 || memcmp(p, "HTTP/1.", 7) != 0)
        return 0;
    return p[7] == '1' ? 11 : p[7] == '0' ? 10 : 0;
}

static PyObject *
scan_request(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyBytes_CheckExact(arg))
        Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);

    /* Request line: a known method, SP, an origin-form target, SP, HTTP/1.x, CRLF. */
    Py_ssize_t i = 0;
    while (i < n && p[i] >= 'A' && p[i] <= 'Z')
        i++;
    if (i >= n || p[i] != ' ')
        Py_RETURN_NONE;
    PyObject *method = NULL;
    for (int m = 0; m < 7; m++) {
        if ((Py_ssize_t)strlen(method_names[m]) == i && memcmp(p, method_names[m], i) == 0) {
            method = method_objs[m];
            break;
        }
    }
    if (method == NULL)
        Py_RETURN_NONE;
    Py_ssize_t tstart = ++i;
    if (i >= n || p[i] != '/')
        Py_RETURN_NONE;
    while (i < n && is_target[p[i]])
        i++;
    Py_ssize_t tend = i;
    if (i >= n || p[i] != ' ')
        Py_RETURN_NONE;
    i++;
    int version = version_at(p + i, n - i);
    if (!version || i + 10 > n || p[i + 8] != '\r' || p[i + 9] != '\n')
        Py_RETURN_NONE;
    i += 10;

    struct fields f;
    header_lines(p, i, n, &f, 1);
    if (!f.simple || f.n_host > 1 || f.n_length > 1 || f.n_te > 1 || f.n_connection > 1)
        Py_RETURN_NONE;
    if (f.n_host) {
        if (!simple_host(f.host, f.host_len))
            Py_RETURN_NONE;
    } else if (version == 11) {
        Py_RETURN_NONE; /* refused by the full parser, with its reason */
    }
    int body = BODY_NONE;
    long long length = 0;
    if (f.n_te) {
        if (f.n_length || version == 10)
            Py_RETURN_NONE;
        body = BODY_CHUNKED;
    } else if (f.n_length && f.length) {
        body = BODY_LENGTH;
        length = f.length;
    }
    /* llhttp's should_keep_alive(): a request never needs the connection's end. */
    int keep_alive = version == 11 ? !f.close : f.keep_alive;

    PyObject *target = PyBytes_FromStringAndSize((const char *)p + tstart, tend - tstart);
    if (target == NULL)
        return NULL;
    PyObject *host = f.n_host ? PyUnicode_DecodeASCII((const char *)f.host, f.host_len, NULL)
                              : PyUnicode_New(0, 0);
    if (host == NULL) {
        Py_DECREF(target);
        return NULL;
    }
    /* (method, target, version, host, keep_alive, upgrade, body, length, expect_continue) */
    return Py_BuildValue("(ONONOOiLO)", method, target, version == 11 ? v11 : v10, host,
                         keep_alive ? Py_True : Py_False, Py_False, body, length, Py_False);
}

static PyObject *
scan_response(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "scan_response(head, request_method)");
        return NULL;
    }
    PyObject *arg = args[0], *req_method = args[1];
    if (!PyBytes_CheckExact(arg) || !PyBytes_CheckExact(req_method))
        Py_RETURN_NONE;
    /* A response to HEAD has no body whatever its head says; CONNECT's 2xx is a tunnel. */
    const char *rm = PyBytes_AS_STRING(req_method);
    if (strcmp(rm, "HEAD") == 0 || strcmp(rm, "CONNECT") == 0)
        Py_RETURN_NONE;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);

    /* Status line: HTTP/1.x SP 3DIGIT SP reason CRLF, a final status other than 204/304. */
    int version = version_at(p, n);
    if (!version || n < 13 || p[8] != ' ' || p[12] != ' ')
        Py_RETURN_NONE;
    int status = 0;
    for (int k = 9; k < 12; k++) {
        if (p[k] < '0' || p[k] > '9')
            Py_RETURN_NONE;
        status = status * 10 + (p[k] - '0');
    }
    if (status < 200 || status > 599 || status == 204 || status == 304)
        Py_RETURN_NONE;
    Py_ssize_t i = 13;
    while (i < n && is_vchar_ws[p[i]])
        i++;
    Py_ssize_t reason_end = i;
    if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n')
        Py_RETURN_NONE;
    i += 2;

    struct fields f;
    header_lines(p, i, n, &f, 0);
    if (!f.simple || f.n_length > 1 || f.n_te > 1 || f.n_connection > 1)
        Py_RETURN_NONE;
    int body;
    long long length = 0;
    if (f.n_te) {
        if (f.n_length || version == 10)
            Py_RETURN_NONE;
        body = BODY_CHUNKED;
    } else if (f.n_length) {
        body = f.length ? BODY_LENGTH : BODY_NONE;
        length = f.length;
    } else {
        body = BODY_UNTIL_CLOSE;
    }
    /* llhttp's should_keep_alive(), asked when the headers are complete: the Connection token
     * by version, and a body that ends by itself; a body read until close keeps nothing alive. */
    int keep_alive = (version == 11 ? !f.close : f.keep_alive) && body != BODY_UNTIL_CLOSE;

    PyObject *reason = PyBytes_FromStringAndSize((const char *)p + 13, reason_end - 13);
    if (reason == NULL)
        return NULL;
    /* (status, reason, version, keep_alive, body, length) */
    return Py_BuildValue("(iNOOiL)", status, reason, version == 11 ? v11 : v10,
                         keep_alive ? Py_True : Py_False, body, length);
}

static PyMethodDef methods[] = {
    {"scan_request", (PyCFunction)scan_request, METH_O,
     "scan_request(head) -> (method, target, version, host, keep_alive, upgrade, body, length,\n"
     "expect_continue) for a head of the simple common shape, else None."},
    {"scan_response", (PyCFunction)(void (*)(void))scan_response, METH_FASTCALL,
     "scan_response(head, request_method) -> (status, reason, version, keep_alive, body, length)\n"
     "for a head of the simple common shape, else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "Compiled fast path of tunneld.http1._wire's head parsers (see _speedups.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_tables();
    for (int m = 0; m < 7; m++) {
        method_objs[m] = PyBytes_FromString(method_names[m]);
        if (method_objs[m] == NULL)
            return NULL;
    }
    v10 = PyUnicode_InternFromString("1.0");
    v11 = PyUnicode_InternFromString("1.1");
    if (v10 == NULL || v11 == NULL)
        return NULL;
    return PyModule_Create(&module_def);
}
