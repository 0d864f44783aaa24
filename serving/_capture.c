/* The capture's request path in C: one call copies an answered request into its batch.
 *
 * onnxflow.serving.capture works without this module (the same steps in Python, about
 * four microseconds more per request on the serving thread); setuptools builds it where a
 * C compiler and Python's headers are found (``optional``: an install without them goes
 * on without it).
 *
 *     append(columns, arrays, request_id, at, latency) -> bool
 *
 * ``columns`` is a batch's ``(sinks, sizes, formats, id_sink, id_lengths, times,
 * latency)``: a bytearray per tensor, the byte size and buffer format every request's
 * tensor must have (the batch's first request's), then bytearrays for the ids' UTF-8
 * bytes, their lengths (C ints), times and latencies (C doubles). ``arrays`` is a list of
 * the request's tensors in the sinks' order. When every tensor is C-contiguous with its
 * sink's size and format, the request is appended whole and the result is True; else
 * nothing changes and the result is False (the Python path takes it: a view, another
 * shape, another type). A failure to grow a sink (memory) raises, every sink as it was.
 *
 * It holds the GIL throughout and calls no Python code: in the endpoint only the event
 * loop offers; without a loop the capture's lock is held around it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_TENSORS 64

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

static PyObject *
append(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "append(columns, arrays, request_id, at, latency) takes 5 arguments");
        return NULL;
    }
    PyObject *columns = args[0], *arrays = args[1], *request_id = args[2];
    if (!PyTuple_CheckExact(columns) || PyTuple_GET_SIZE(columns) != 7 ||
        !PyList_CheckExact(arrays) || !PyUnicode_Check(request_id)) {
        PyErr_SetString(PyExc_TypeError,
                        "append() takes a 7-tuple of columns, a list of arrays and a str id");
        return NULL;
    }
    double at = PyFloat_AsDouble(args[3]);
    double latency = PyFloat_AsDouble(args[4]);
    if ((at == -1.0 || latency == -1.0) && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *sinks = PyTuple_GET_ITEM(columns, 0);
    PyObject *sizes = PyTuple_GET_ITEM(columns, 1);
    PyObject *formats = PyTuple_GET_ITEM(columns, 2);
    PyObject *tail[4];  /* id_sink, id_lengths, times, latency */
    for (int k = 0; k < 4; k++) {
        tail[k] = PyTuple_GET_ITEM(columns, 3 + k);
        if (!PyByteArray_CheckExact(tail[k])) {
            PyErr_SetString(PyExc_TypeError, "a batch's id, time and latency columns are bytearrays");
            return NULL;
        }
    }
    Py_ssize_t n = PyList_GET_SIZE(arrays);
    if (!PyTuple_CheckExact(sinks) || !PyTuple_CheckExact(sizes) || !PyTuple_CheckExact(formats) ||
        PyTuple_GET_SIZE(sinks) != n || PyTuple_GET_SIZE(sizes) != n ||
        PyTuple_GET_SIZE(formats) != n || n > MAX_TENSORS) {
        Py_RETURN_FALSE;
    }

    /* 1. every tensor's buffer, checked against its column; nothing written yet */
    Py_buffer views[MAX_TENSORS];
    Py_ssize_t got = 0;
    int simple = 1;
    for (; got < n; got++) {
        PyObject *sink = PyTuple_GET_ITEM(sinks, got);
        if (!PyByteArray_CheckExact(sink) ||
            PyObject_GetBuffer(PyList_GET_ITEM(arrays, got), &views[got],
                               PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();  /* not a buffer, or not contiguous: the Python path's */
            simple = 0;
            break;
        }
        Py_buffer *view = &views[got];
        Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, got));
        const char *format = PyBytes_Check(PyTuple_GET_ITEM(formats, got))
                                 ? PyBytes_AS_STRING(PyTuple_GET_ITEM(formats, got))
                                 : NULL;
        if (view->len != size || format == NULL ||
            strcmp(view->format ? view->format : "B", format) != 0) {
            PyErr_Clear();
            got++;  /* released below */
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
            grown--;  /* the one that failed did not grow */
            PyObject *error_type, *error_value, *error_traceback;
            PyErr_Fetch(&error_type, &error_value, &error_traceback);
            for (Py_ssize_t i = 0; i < grown; i++) {
                PyObject *sink = i < n ? PyTuple_GET_ITEM(sinks, i) : tail[i - n];
                PyByteArray_Resize(sink, olds[i]);  /* shrinking does not fail */
            }
            PyErr_Restore(error_type, error_value, error_traceback);
        }
    }
    for (Py_ssize_t i = 0; i < got; i++) {
        PyBuffer_Release(&views[i]);
    }
    if (failed) {
        return NULL;
    }
    return PyBool_FromLong(simple);
}

static PyMethodDef methods[] = {
    {"append", (PyCFunction)(void (*)(void))append, METH_FASTCALL,
     "append(columns, arrays, request_id, at, latency) -> bool\n\n"
     "Copy one request into a batch's columns; False (nothing changed) when a tensor is\n"
     "not C-contiguous or its byte size or format is not its column's."},
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
    return PyModule_Create(&module);
}
