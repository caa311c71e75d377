/* Decrypt every whole TLS record the engine holds in one call (tunneld.core._tls).
 *
 * OpenSSL's SSL_read returns one record at most: 16 KiB.  Called from Python through cffi,
 * each record cost a call, a GIL release and reacquire, and a look at what is left (SSL_pending
 * and the read BIO): 64 rounds per MiB received.  Here the loop runs in C with the GIL released
 * once; a bulk receiver spends ~8 % less CPU per GiB (README, "A bulk read is decrypted in one
 * call").  _tls.py calls it only for bulk reads: it always ends with an SSL_read that fails,
 * which a small read does not need.
 *
 * OpenSSL is the one inside the cryptography package, reached through the cffi binding that
 * pyOpenSSL uses: the caller hands this module the addresses of SSL_read and SSL_get_error
 * (configure) and of the SSL object and buffer (read_records).  Nothing here links to OpenSSL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>

typedef int (*ssl_read_fn)(void *ssl, void *buf, int num);
typedef int (*ssl_get_error_fn)(const void *ssl, int ret);

static ssl_read_fn ssl_read;
static ssl_get_error_fn ssl_get_error;
static int want_read_code;

/* Statuses of read_records besides SSL_read's own failing return values (<= 0). */
#define FULL 1
#define NEEDS_INPUT 2

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *read_addr, *error_addr;
    int want_read;
    if (!PyArg_ParseTuple(args, "O!O!i:configure", &PyLong_Type, &read_addr, &PyLong_Type, &error_addr,
                          &want_read)) {
        return NULL;
    }
    void *r = PyLong_AsVoidPtr(read_addr);
    void *e = PyLong_AsVoidPtr(error_addr);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (r == NULL || e == NULL) {
        PyErr_SetString(PyExc_ValueError, "configure: null function address");
        return NULL;
    }
    ssl_read = (ssl_read_fn)r;
    ssl_get_error = (ssl_get_error_fn)e;
    want_read_code = want_read;
    Py_RETURN_NONE;
}

/* read_records(ssl, buf, size) -> (got, status)
 *
 * SSL_read into buf[got:size] until it fails or the buffer is full.  status: FULL (1), the
 * buffer is full; NEEDS_INPUT (2), the engine wants more ciphertext (SSL_ERROR_WANT_READ);
 * otherwise SSL_read's failing return value (<= 0), for the caller to raise as pyOpenSSL does
 * (SSL_get_error only peeks at the error queue, so the caller may ask again).
 */
static PyObject *
read_records(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "read_records(ssl, buf, size) takes 3 arguments");
        return NULL;
    }
    if (ssl_read == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "read_records: configure() was not called");
        return NULL;
    }
    void *ssl = PyLong_AsVoidPtr(args[0]);
    char *buf = (char *)PyLong_AsVoidPtr(args[1]);
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (ssl == NULL || buf == NULL || size < 1) {
        PyErr_SetString(PyExc_ValueError, "read_records: null pointer or empty buffer");
        return NULL;
    }
    Py_ssize_t got = 0;
    int status = FULL;
    Py_BEGIN_ALLOW_THREADS
    while (got < size) {
        Py_ssize_t room = size - got;
        int n = ssl_read(ssl, buf + got, room > INT_MAX ? INT_MAX : (int)room);
        if (n <= 0) {
            status = ssl_get_error(ssl, n) == want_read_code ? NEEDS_INPUT : n;
            break;
        }
        got += n;
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ni)", got, status);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(ssl_read_address, ssl_get_error_address, want_read_code): the OpenSSL functions to call."},
    {"read_records", (PyCFunction)(void (*)(void))read_records, METH_FASTCALL,
     "read_records(ssl_address, buffer_address, size) -> (got, status)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tlsread", "Every whole TLS record decrypted in one call.", -1, methods,
};

PyMODINIT_FUNC
PyInit__tlsread(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "FULL", FULL) < 0 || PyModule_AddIntConstant(m, "NEEDS_INPUT", NEEDS_INPUT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
