/* A strict parser for the one shape of request that dominates a Keep server's traffic: a complete GET, HEAD or
 * PUT of a block, with all of it (headers, and a PUT's whole body) in one chunk read from the socket.
 *
 *   parse(data) -> (method, target, headers, body_offset) | None
 *
 * ``headers`` is a list of (name, value) str pairs in arrival order, values without surrounding blanks. None means
 * "not this shape": the caller hands the bytes to aiohttp's parser (llhttp), which either parses them or answers
 * with the error it would give. So this parser accepts only what llhttp and aiohttp would accept *and* treat the
 * same way, and leaves everything else to them, including every request whose framing is not trivial:
 *
 *   - request line: GET, HEAD or PUT, one space, a target of printable ASCII starting with "/" (no "#", quotes,
 *     angle brackets, backslash, "^", "`", braces or "|"), one space, "HTTP/1.1", CRLF;
 *   - header lines: a token, ":", optional blanks, a value of printable ASCII, spaces and tabs, CRLF; no
 *     obs-fold, no obs-text, no control characters; at most 128 headers and 8190 bytes per line (aiohttp's
 *     limits: past them it answers 400 or 431);
 *   - a Host header (aiohttp refuses HTTP/1.1 without one), and no second copy of a header aiohttp allows once;
 *   - none of Transfer-Encoding, Upgrade, Expect, Sec-WebSocket-Key1; Connection only as "keep-alive";
 *   - GET and HEAD: no Content-Length, nothing after the blank line (no pipelined request behind it);
 *   - PUT: one Content-Length of decimal digits, and exactly that many bytes after the blank line.
 *
 * The caller must only use it where aiohttp's parser holds nothing of an earlier chunk (keepstore/http/protocol.py
 * uses it until the first chunk that goes to llhttp). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#define MAX_LINE 8190
#define MAX_HEADERS 128

static unsigned char tchar[256];   /* header-name characters (RFC 9110 token) */
static unsigned char vchar[256];   /* header-value characters: VCHAR, SP, HTAB */
static unsigned char target_ok[256];

/* Headers aiohttp refuses to see twice (its SINGLETON_HEADERS). */
static const char *const singletons[] = {
    "content-length", "content-location", "content-range", "content-type", "etag",
    "host",           "max-forwards",     "server",        "transfer-encoding", "user-agent",
};
#define NSINGLETONS (sizeof(singletons) / sizeof(singletons[0]))

static int name_is(const char *p, size_t n, const char *lower) {
    return strlen(lower) == n && strncasecmp(p, lower, n) == 0;
}

static PyObject *parse(PyObject *module, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse() takes bytes");
        return NULL;
    }
    const char *buf = PyBytes_AS_STRING(arg);
    size_t len = (size_t)PyBytes_GET_SIZE(arg);

    /* request line */
    size_t mlen;
    if (len >= 4 && memcmp(buf, "GET ", 4) == 0)
        mlen = 3;
    else if (len >= 4 && memcmp(buf, "PUT ", 4) == 0)
        mlen = 3;
    else if (len >= 5 && memcmp(buf, "HEAD ", 5) == 0)
        mlen = 4;
    else
        Py_RETURN_NONE;
    int put = buf[0] == 'P';
    size_t tstart = mlen + 1, p = tstart;
    if (p >= len || buf[p] != '/') Py_RETURN_NONE;
    while (p < len && target_ok[(unsigned char)buf[p]]) p++;
    size_t tend = p;
    if (len - p < 11 || memcmp(buf + p, " HTTP/1.1\r\n", 11) != 0) Py_RETURN_NONE;
    p += 11;
    if (p - 2 > MAX_LINE) Py_RETURN_NONE;

    /* header lines, up to the blank line */
    struct {
        size_t name, name_len, value, value_len;
    } fields[MAX_HEADERS];
    size_t nfields = 0;
    unsigned seen = 0; /* bit i: singletons[i] seen */
    long long content_length = -1;
    for (;;) {
        if (p + 2 <= len && buf[p] == '\r' && buf[p + 1] == '\n') {
            p += 2;
            break;
        }
        if (nfields == MAX_HEADERS) Py_RETURN_NONE;
        size_t line = p, name = p;
        while (p < len && tchar[(unsigned char)buf[p]]) p++;
        if (p == name || p >= len || buf[p] != ':') Py_RETURN_NONE;
        size_t name_len = p - name;
        p++;
        while (p < len && (buf[p] == ' ' || buf[p] == '\t')) p++;
        size_t value = p;
        while (p < len && vchar[(unsigned char)buf[p]]) p++;
        size_t value_end = p;
        while (value_end > value && (buf[value_end - 1] == ' ' || buf[value_end - 1] == '\t')) value_end--;
        if (p + 2 > len || buf[p] != '\r' || buf[p + 1] != '\n') Py_RETURN_NONE;
        if (p - line > MAX_LINE) Py_RETURN_NONE;
        p += 2;

        const char *n = buf + name;
        size_t vlen = value_end - value;
        for (size_t i = 0; i < NSINGLETONS; i++) {
            if (name_is(n, name_len, singletons[i])) {
                if (seen & (1u << i)) Py_RETURN_NONE;
                seen |= 1u << i;
                break;
            }
        }
        if (name_is(n, name_len, "transfer-encoding") || name_is(n, name_len, "upgrade") ||
            name_is(n, name_len, "expect") || name_is(n, name_len, "sec-websocket-key1"))
            Py_RETURN_NONE;
        if (name_is(n, name_len, "connection") && !(vlen == 10 && strncasecmp(buf + value, "keep-alive", 10) == 0))
            Py_RETURN_NONE;
        if (name_is(n, name_len, "content-length")) {
            if (!put || vlen == 0 || vlen > 18) Py_RETURN_NONE;
            long long v = 0;
            for (size_t i = 0; i < vlen; i++) {
                char c = buf[value + i];
                if (c < '0' || c > '9') Py_RETURN_NONE;
                v = v * 10 + (c - '0');
            }
            content_length = v;
        }
        fields[nfields].name = name;
        fields[nfields].name_len = name_len;
        fields[nfields].value = value;
        fields[nfields].value_len = vlen;
        nfields++;
    }
    if (!(seen & (1u << 5))) Py_RETURN_NONE; /* no Host */
    if (put ? content_length < 0 || (unsigned long long)(len - p) != (unsigned long long)content_length : p != len)
        Py_RETURN_NONE;

    PyObject *method = PyUnicode_FromStringAndSize(buf, (Py_ssize_t)mlen);
    PyObject *target = PyUnicode_FromStringAndSize(buf + tstart, (Py_ssize_t)(tend - tstart));
    PyObject *headers = PyList_New((Py_ssize_t)nfields);
    if (!method || !target || !headers) goto fail;
    for (size_t i = 0; i < nfields; i++) {
        PyObject *pair = Py_BuildValue("(s#s#)", buf + fields[i].name, (Py_ssize_t)fields[i].name_len,
                                       buf + fields[i].value, (Py_ssize_t)fields[i].value_len);
        if (!pair) goto fail;
        PyList_SET_ITEM(headers, (Py_ssize_t)i, pair);
    }
    return Py_BuildValue("(NNNn)", method, target, headers, (Py_ssize_t)p);
fail:
    Py_XDECREF(method);
    Py_XDECREF(target);
    Py_XDECREF(headers);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"parse", parse, METH_O,
     "parse(data): (method, target, headers, body_offset) of one complete simple request, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "keepstore._reqparse", "A strict parser for simple block requests (see the C source).",
    -1, module_methods,
};

PyMODINIT_FUNC PyInit__reqparse(void) {
    const char *token_extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        tchar[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                   (c && strchr(token_extra, c) != NULL);
        vchar[c] = (c >= 0x21 && c <= 0x7e) || c == ' ' || c == '\t';
        target_ok[c] = c >= 0x21 && c <= 0x7e && !strchr("#\"<>\\^`{|}", c);
    }
    return PyModule_Create(&moduledef);
}
