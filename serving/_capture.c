/* The capture's request path in C: one call copies an answered request into its batch.
 *
 * onnxflow.serving.capture works without this module (the same steps in Python, a few
 * microseconds more per request on the serving thread); setuptools builds it where a C
 * compiler and Python's headers are found (``optional``: an install without them goes on
 * without it).
 *
 *     append(columns, arrays, request_id, at, latency) -> bool
 *
 * ``columns`` is a batch's ``(sinks, sizes, formats, id_sink, id_lengths, times, latency,
 * ...)``: a bytearray per tensor, the byte size and buffer format every request's tensor
 * must have (the batch's first request's), then bytearrays for the ids' UTF-8 bytes,
 * their lengths (C ints), times and latencies (C doubles). ``arrays`` is a list of the
 * request's tensors in the sinks' order. When every tensor is C-contiguous with its
 * sink's size and format, the request is appended whole and the result is True; else
 * nothing changes and the result is False (the Python path takes it: a view, another
 * shape, another type). A failure to grow a sink (memory) raises, every sink as it was.
 *
 *     offer(state, model, request_id, feeds, results, latency) -> None
 *
 * The whole request path for a request like its batch's first: ``state`` is ``(tally,
 * batches, fallback, queue_bytes)``; ``tally`` is the capture's bytes offered and taken by
 * the writer (a bytearray of two C int64s); the batch is ``batches[id(model)]``, whose
 * ``columns`` go on with ``(inputs, request_bytes, limit, batch_tally)`` (the batch's
 * bytes, one C int64). The request is appended when the batch takes requests from C
 * (``columns`` not None), stays below ``limit`` requests with it, the capture's queue has
 * room (offered - taken) and ``append`` takes it; then the batch's bytes and the offered
 * bytes grow by ``request_bytes``, in place (setting Python attributes cost more than the
 * copy). Anything else (a new batch, the request that fills one, a full queue, another
 * shape) is ``fallback(model, request_id, feeds, results, latency)``: the Python path,
 * which knows every case.
 *
 * Both hold the GIL throughout and call no Python code but ``fallback``: only the
 * endpoint's event loop offers (without a loop the capture's lock is held around it).
 *
 *     start_ids(prefix, first) -> None;  new_id() -> str
 *
 * Request ids: ``prefix`` (16 ASCII characters, random per process) then a counter from
 * ``first`` in 16 decimal digits (Python's f-string of the two cost four times as much,
 * on every request of an endpoint that captures).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAX_TENSORS 64

static PyObject *str_columns;

/* Append ``len`` bytes to a bytearray. Past its allocation it is first grown to twice what
 * it needs, then resized down to that (which keeps the allocation): a batch's buffers are
 * copied a few times as they grow, not the dozens of times that bytearray's own growth by
 * an eighth copies them (most of this call's cost, measured with callgrind). */
static int
grow(PyObject *sink, Py_ssize_t *old, const void *data, Py_ssize_t len)
{
    *old = PyByteArray_GET_SIZE(sink);
    Py_ssize_t size = *old + len;
    if (size >= ((PyByteArrayObject *)sink)->ob_alloc &&
        PyByteArray_Resize(sink, 2 * size) < 0) { /* then size >= alloc / 2: kept */
        return -1;
    }
    if (PyByteArray_Resize(sink, size) < 0) {
        return -1;
    }
    memcpy(PyByteArray_AS_STRING(sink) + *old, data, (size_t)len);
    return 0;
}

/* 1: appended; 0: not a request like the batch's first, nothing changed; -1: an error
 * set, nothing changed. */
static int
append_arrays(PyObject *columns, PyObject *const *arrays, Py_ssize_t n, PyObject *request_id,
              double at, double latency)
{
    if (!PyTuple_CheckExact(columns) || PyTuple_GET_SIZE(columns) < 7 ||
        !PyUnicode_Check(request_id)) {
        PyErr_SetString(PyExc_TypeError, "append() takes a batch's columns and a str id");
        return -1;
    }
    PyObject *sinks = PyTuple_GET_ITEM(columns, 0);
    PyObject *sizes = PyTuple_GET_ITEM(columns, 1);
    PyObject *formats = PyTuple_GET_ITEM(columns, 2);
    PyObject *tail[4]; /* id_sink, id_lengths, times, latency */
    for (int k = 0; k < 4; k++) {
        tail[k] = PyTuple_GET_ITEM(columns, 3 + k);
        if (!PyByteArray_CheckExact(tail[k])) {
            PyErr_SetString(PyExc_TypeError,
                            "a batch's id, time and latency columns are bytearrays");
            return -1;
        }
    }
    if (!PyTuple_CheckExact(sinks) || !PyTuple_CheckExact(sizes) || !PyTuple_CheckExact(formats) ||
        PyTuple_GET_SIZE(sinks) != n || PyTuple_GET_SIZE(sizes) != n ||
        PyTuple_GET_SIZE(formats) != n || n > MAX_TENSORS) {
        return 0;
    }

    /* 1. every tensor's buffer, checked against its column; nothing written yet */
    Py_buffer views[MAX_TENSORS];
    Py_ssize_t got = 0;
    int simple = 1;
    for (; got < n; got++) {
        PyObject *sink = PyTuple_GET_ITEM(sinks, got);
        if (!PyByteArray_CheckExact(sink) ||
            PyObject_GetBuffer(arrays[got], &views[got], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear(); /* not a buffer, or not contiguous: the Python path's */
            simple = 0;
            break;
        }
        Py_buffer *view = &views[got];
        Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, got));
        PyObject *format = PyTuple_GET_ITEM(formats, got);
        if (view->len != size || !PyBytes_Check(format) ||
            strcmp(view->format ? view->format : "B", PyBytes_AS_STRING(format)) != 0) {
            PyErr_Clear();
            got++; /* released below */
            simple = 0;
            break;
        }
    }
    Py_ssize_t id_len = 0;
    const char *id = NULL;
    if (simple) {
        id = PyUnicode_AsUTF8AndSize(request_id, &id_len);
        if (id == NULL || id_len > INT_MAX) {
            PyErr_Clear();
            simple = 0;
        }
    }

    /* 2. append, or put back what was appended */
    Py_ssize_t olds[MAX_TENSORS + 4];
    Py_ssize_t grown = 0;
    int failed = 0;
    if (simple) {
        int length = (int)id_len;
        const void *data[4] = {id, &length, &at, &latency};
        const Py_ssize_t lens[4] = {id_len, sizeof(int), sizeof(double), sizeof(double)};
        for (; grown < n + 4 && !failed; grown++) {
            if (grown < n) {
                failed = grow(PyTuple_GET_ITEM(sinks, grown), &olds[grown], views[grown].buf,
                              views[grown].len);
            } else {
                Py_ssize_t k = grown - n;
                failed = grow(tail[k], &olds[grown], data[k], lens[k]);
            }
        }
        if (failed) {
            grown--; /* the one that failed did not grow */
            PyObject *error_type, *error_value, *error_traceback;
            PyErr_Fetch(&error_type, &error_value, &error_traceback);
            for (Py_ssize_t i = 0; i < grown; i++) {
                PyObject *sink = i < n ? PyTuple_GET_ITEM(sinks, i) : tail[i - n];
                PyByteArray_Resize(sink, olds[i]); /* shrinking does not fail */
            }
            PyErr_Restore(error_type, error_value, error_traceback);
        }
    }
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&views[i]);
    }
    return failed ? -1 : simple;
}

static PyObject *
append(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5 || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "append(columns, arrays: list, request_id, at, latency) takes 5 arguments");
        return NULL;
    }
    double at = PyFloat_AsDouble(args[3]);
    double latency = PyFloat_AsDouble(args[4]);
    if ((at == -1.0 || latency == -1.0) && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *arrays = args[1];
    int taken = append_arrays(args[0], PySequence_Fast_ITEMS(arrays), PyList_GET_SIZE(arrays),
                              args[2], at, latency);
    if (taken < 0) {
        return NULL;
    }
    return PyBool_FromLong(taken);
}

/* The C int64s of a tally (a bytearray, see the module's docstring), or NULL. A bytearray's
 * buffer is malloc'd (aligned for int64) and these are never resized. */
static int64_t *
tally_of(PyObject *tally, Py_ssize_t count)
{
    if (!PyByteArray_CheckExact(tally) ||
        PyByteArray_GET_SIZE(tally) != count * (Py_ssize_t)sizeof(int64_t)) {
        return NULL;
    }
    return (int64_t *)PyByteArray_AS_STRING(tally);
}

/* 1: taken; 0: the fallback's to take (nothing changed); -1: an error (nothing changed) */
static int
offer_here(PyObject *capture_tally, PyObject *batches, Py_ssize_t queue_bytes, PyObject *model,
           PyObject *request_id, PyObject *feeds, PyObject *results, PyObject *latency_s)
{
    if (!PyUnicode_Check(request_id) || !PyDict_CheckExact(feeds) ||
        !(PyList_CheckExact(results) || PyTuple_CheckExact(results)) ||
        !PyDict_CheckExact(batches)) {
        return 0;
    }
    int64_t *counts = tally_of(capture_tally, 2); /* offered, taken */
    if (counts == NULL) {
        return 0;
    }
    double latency = PyFloat_AsDouble(latency_s);
    if (latency == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *key = PyLong_FromVoidPtr(model); /* id(model) */
    if (key == NULL) {
        return -1;
    }
    PyObject *batch = PyDict_GetItemWithError(batches, key); /* borrowed */
    Py_DECREF(key);
    if (batch == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(batch);
    int taken = 0;
    PyObject *columns = PyObject_GetAttr(batch, str_columns);
    if (columns == NULL) {
        taken = -1;
        goto done;
    }
    if (!PyTuple_CheckExact(columns) || PyTuple_GET_SIZE(columns) != 11) {
        goto done; /* None: the batch keeps every request's shapes, Python's */
    }
    PyObject *inputs = PyTuple_GET_ITEM(columns, 7);
    Py_ssize_t request_bytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(columns, 8));
    Py_ssize_t limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(columns, 9));
    PyObject *times = PyTuple_GET_ITEM(columns, 5);
    int64_t *batch_bytes = tally_of(PyTuple_GET_ITEM(columns, 10), 1);
    if (!PyTuple_CheckExact(inputs) || !PyByteArray_CheckExact(times) || batch_bytes == NULL ||
        ((request_bytes == -1 || limit == -1) && PyErr_Occurred())) {
        PyErr_Clear();
        goto done;
    }
    /* the request that fills the batch is the fallback's: it hands the batch over */
    if ((Py_ssize_t)(PyByteArray_GET_SIZE(times) / sizeof(double)) + 1 >= limit) {
        goto done;
    }
    if (counts[0] - counts[1] + request_bytes > queue_bytes) {
        goto done; /* the fallback counts the drop */
    }
    Py_ssize_t n_in = PyTuple_GET_SIZE(inputs), n = n_in + PySequence_Fast_GET_SIZE(results);
    if (n > MAX_TENSORS) {
        goto done;
    }
    PyObject *arrays[MAX_TENSORS];
    for (Py_ssize_t i = 0; i < n_in; i++) {
        arrays[i] = PyDict_GetItemWithError(feeds, PyTuple_GET_ITEM(inputs, i));
        if (arrays[i] == NULL) { /* an input missing: the fallback says so */
            taken = PyErr_Occurred() ? -1 : 0;
            goto done;
        }
    }
    for (Py_ssize_t i = n_in; i < n; i++) {
        arrays[i] = PySequence_Fast_GET_ITEM(results, i - n_in);
    }
    struct timespec now;
    timespec_get(&now, TIME_UTC); /* time.time()'s clock */
    double at = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    taken = append_arrays(columns, arrays, n, request_id, at, latency);
    if (taken == 1) {
        *batch_bytes += request_bytes;
        counts[0] += request_bytes;
    }
done:
    Py_XDECREF(columns);
    Py_DECREF(batch);
    return taken;
}

static PyObject *
offer(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "offer((tally, batches, fallback, queue_bytes), model, request_id, "
                        "feeds, results, latency)");
        return NULL;
    }
    PyObject *state = args[0];
    Py_ssize_t queue_bytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, 3));
    if (queue_bytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int taken = offer_here(PyTuple_GET_ITEM(state, 0), PyTuple_GET_ITEM(state, 1), queue_bytes,
                           args[1], args[2], args[3], args[4], args[5]);
    if (taken == 1) {
        Py_RETURN_NONE;
    }
    PyErr_Clear(); /* the fallback meets the same error, and counts it */
    return PyObject_Vectorcall(PyTuple_GET_ITEM(state, 2), args + 1, 5, NULL);
}

#define ID_PREFIX 16
#define ID_DIGITS 16

static char id_prefix[ID_PREFIX];
static unsigned long long id_next = 0; /* 0: start_ids() was not called */

static PyObject *
start_ids(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t len = 0;
    const char *prefix = nargs == 2 && PyUnicode_Check(args[0])
                             ? PyUnicode_AsUTF8AndSize(args[0], &len)
                             : NULL;
    unsigned long long first = prefix ? PyLong_AsUnsignedLongLong(args[1]) : 0;
    if (prefix == NULL || len != ID_PREFIX || first < 1000000000000000ULL ||
        first > 8999999999999999ULL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "start_ids(prefix: 16 ASCII characters, first: "
                                          "a number of 16 digits, below 9e15)");
        return NULL;
    }
    memcpy(id_prefix, prefix, ID_PREFIX);
    id_next = first;
    Py_RETURN_NONE;
}

static PyObject *
new_id(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    if (id_next == 0 || id_next > 9999999999999999ULL) {
        PyErr_SetString(PyExc_RuntimeError, "new_id(): start_ids() first");
        return NULL;
    }
    PyObject *id = PyUnicode_New(ID_PREFIX + ID_DIGITS, 127);
    if (id == NULL) {
        return NULL;
    }
    char *out = (char *)PyUnicode_DATA(id);
    memcpy(out, id_prefix, ID_PREFIX);
    unsigned long long n = id_next++;
    for (int i = ID_PREFIX + ID_DIGITS - 1; i >= ID_PREFIX; i--, n /= 10) {
        out[i] = (char)('0' + n % 10);
    }
    return id;
}

static PyMethodDef methods[] = {
    {"start_ids", (PyCFunction)(void (*)(void))start_ids, METH_FASTCALL,
     "start_ids(prefix, first) -> None\n\nRequest ids from now on: prefix (16 ASCII\n"
     "characters), then a counter from first in 16 digits."},
    {"new_id", new_id, METH_NOARGS, "new_id() -> str\n\nThe next request id."},
    {"append", (PyCFunction)(void (*)(void))append, METH_FASTCALL,
     "append(columns, arrays, request_id, at, latency) -> bool\n\n"
     "Copy one request into a batch's columns; False (nothing changed) when a tensor is\n"
     "not C-contiguous or its byte size or format is not its column's."},
    {"offer", (PyCFunction)(void (*)(void))offer, METH_FASTCALL,
     "offer(state, model, request_id, feeds, results, latency) -> None\n\n"
     "The request path for a request like its batch's first; anything else is the\n"
     "state's fallback's (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_capture",
    "The capture's request path in C (onnxflow.serving.capture works without it).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__capture(void)
{
    str_columns = PyUnicode_InternFromString("columns");
    if (!str_columns) {
        return NULL;
    }
    return PyModule_Create(&module);
}
