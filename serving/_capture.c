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
 * The whole request path for a request like its batch's first: ``state`` is ``(capture,
 * batches, fallback, queue_bytes)``; the batch is ``batches[id(model)]``, whose
 * ``columns`` go on with ``(inputs, request_bytes, limit)``. The request is appended when
 * the batch takes requests from C (``columns`` not None), stays below ``limit`` requests
 * with it, the capture's queue has room (``capture._offered_bytes - capture._taken_bytes``)
 * and ``append`` takes it; then ``batch.nbytes`` and ``capture._offered_bytes`` grow by
 * ``request_bytes``. Anything else (a new batch, the request that fills one, a full queue,
 * another shape) is ``fallback(model, request_id, feeds, results, latency)``: the Python
 * path, which knows every case.
 *
 * Both hold the GIL throughout and call no Python code but ``fallback``: only the
 * endpoint's event loop offers (without a loop the capture's lock is held around it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <time.h>

#define MAX_TENSORS 64

static PyObject *str_columns, *str_nbytes, *str_offered, *str_taken;

static int
grow(PyObject *sink, Py_ssize_t *old, const void *data, Py_ssize_t len)
{
    *old = PyByteArray_GET_SIZE(sink);
    if (PyByteArray_Resize(sink, *old + len) < 0) {
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

static Py_ssize_t
size_attribute(PyObject *owner, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(owner, name);
    if (value == NULL) {
        return -1;
    }
    Py_ssize_t size = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return size;
}

/* ``owner.name += by``; 0, or -1 with an error set */
static int
add_to_attribute(PyObject *owner, PyObject *name, Py_ssize_t by)
{
    Py_ssize_t value = size_attribute(owner, name);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *sum = PyLong_FromSsize_t(value + by);
    if (sum == NULL) {
        return -1;
    }
    int status = PyObject_SetAttr(owner, name, sum);
    Py_DECREF(sum);
    return status;
}

/* 1: taken; 0: the fallback's to take (nothing changed); -1: an error (nothing changed) */
static int
offer_here(PyObject *capture, PyObject *batches, Py_ssize_t queue_bytes, PyObject *model,
           PyObject *request_id, PyObject *feeds, PyObject *results, PyObject *latency_s)
{
    if (!PyUnicode_Check(request_id) || !PyDict_CheckExact(feeds) ||
        !(PyList_CheckExact(results) || PyTuple_CheckExact(results)) ||
        !PyDict_CheckExact(batches)) {
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
    if (!PyTuple_CheckExact(columns) || PyTuple_GET_SIZE(columns) != 10) {
        goto done; /* None: the batch keeps every request's shapes, Python's */
    }
    PyObject *inputs = PyTuple_GET_ITEM(columns, 7);
    Py_ssize_t request_bytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(columns, 8));
    Py_ssize_t limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(columns, 9));
    PyObject *times = PyTuple_GET_ITEM(columns, 5);
    if (!PyTuple_CheckExact(inputs) || !PyByteArray_CheckExact(times) ||
        ((request_bytes == -1 || limit == -1) && PyErr_Occurred())) {
        PyErr_Clear();
        goto done;
    }
    /* the request that fills the batch is the fallback's: it hands the batch over */
    if ((Py_ssize_t)(PyByteArray_GET_SIZE(times) / sizeof(double)) + 1 >= limit) {
        goto done;
    }
    Py_ssize_t offered = size_attribute(capture, str_offered);
    Py_ssize_t done_bytes = offered == -1 ? -1 : size_attribute(capture, str_taken);
    if (done_bytes == -1 && PyErr_Occurred()) {
        taken = -1;
        goto done;
    }
    if (offered - done_bytes + request_bytes > queue_bytes) {
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
        /* in the batch now, whatever follows: a failure here leaves the counts short
         * (memory for an int), never the request taken twice */
        if (add_to_attribute(batch, str_nbytes, request_bytes) < 0 ||
            add_to_attribute(capture, str_offered, request_bytes) < 0) {
            PyErr_Clear();
        }
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
                        "offer((capture, batches, fallback, queue_bytes), model, request_id, "
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

static PyMethodDef methods[] = {
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
    str_nbytes = PyUnicode_InternFromString("nbytes");
    str_offered = PyUnicode_InternFromString("_offered_bytes");
    str_taken = PyUnicode_InternFromString("_taken_bytes");
    if (!str_columns || !str_nbytes || !str_offered || !str_taken) {
        return NULL;
    }
    return PyModule_Create(&module);
}
