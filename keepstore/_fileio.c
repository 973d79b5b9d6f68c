/* The durable end of a block write, in one call with the GIL released.
 *
 * Committing a block is eight system calls (set mtime, fsync, close, open the directory, lock it, rename, unlock,
 * fsync the directory). Done from Python, each one releases and retakes the GIL, and a volume thread that wants the
 * GIL back waits for the event loop to let go of it: under a stream of small PUTs that handoff costs more CPU than
 * the calls themselves, and it delays every request on the event loop too. Here they run back to back in C.
 *
 *   finish_block(fd, dir_path, tmp_path, final_path)
 *
 * sets the file's mtime to now (nanoseconds) and fsyncs ``fd``, then, holding an exclusive flock on ``dir_path``
 * (keepstore.volumes.directory serialises renames, trash and untrash with it), renames ``tmp_path`` to
 * ``final_path``, closes ``fd`` (always closed, whatever fails) and fsyncs the directory. Raises OSError (errno, message, the path
 * concerned) at the first failure; the temp file is left for the caller to remove.
 *
 *   write_block(dir_path, tmp_path, final_path, data, xattr_name, xattr_value)
 *
 * is the whole write of a block that is in memory: create ``tmp_path`` (O_EXCL, mode 0600; the directory is
 * created if missing), flock it (a live writer's mark, see the start-up sweep), write ``data``, set the xattr if
 * ``xattr_value`` is not None (a hint: failures are ignored but reported), then finish_block. Removes the temp file
 * on any failure. Returns 0, or the errno of a failed setxattr.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int err;
    const char *path;
} failure;

static int commit(int fd, const char *dir_path, const char *tmp_path, const char *final_path, failure *f) {
    struct timespec now[2];
    clock_gettime(CLOCK_REALTIME, &now[0]);
    now[1] = now[0];
    /* ext4 stamps inodes from a coarse clock: set a precise mtime so that index and trash-list mtimes
     * (nanoseconds) are distinct and monotonic. */
    if (futimens(fd, now) != 0 || fsync(fd) != 0) {
        f->err = errno;
        f->path = tmp_path;
        close(fd);
        return -1;
    }
    /* fd stays open (and its flock held) until the rename is done: the start-up sweep of another process removes
     * only temp files that no live writer has locked. */
    int dfd = open(dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        f->err = errno;
        f->path = dir_path;
        close(fd);
        return -1;
    }
    int rc = 0;
    while (flock(dfd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            f->err = errno;
            f->path = dir_path;
            close(dfd);
            close(fd);
            return -1;
        }
    }
    if (rename(tmp_path, final_path) != 0) {
        f->err = errno;
        f->path = tmp_path;
        rc = -1;
    }
    flock(dfd, LOCK_UN);
    if (close(fd) != 0 && rc == 0) {
        f->err = errno;
        f->path = final_path;
        rc = -1;
    }
    if (rc == 0 && fsync(dfd) != 0) {
        f->err = errno;
        f->path = dir_path;
        rc = -1;
    }
    close(dfd);
    return rc;
}

static PyObject *finish_block(PyObject *module, PyObject *args) {
    int fd;
    PyObject *dir_str, *tmp_str, *final_str;
    if (!PyArg_ParseTuple(args, "iUUU", &fd, &dir_str, &tmp_str, &final_str)) return NULL;
    PyObject *dir_b = PyUnicode_EncodeFSDefault(dir_str);
    PyObject *tmp_b = dir_b ? PyUnicode_EncodeFSDefault(tmp_str) : NULL;
    PyObject *final_b = tmp_b ? PyUnicode_EncodeFSDefault(final_str) : NULL;
    PyObject *result = NULL;
    if (final_b) {
        failure f = {0, NULL};
        const char *dir_path = PyBytes_AS_STRING(dir_b);
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = commit(fd, dir_path, PyBytes_AS_STRING(tmp_b), PyBytes_AS_STRING(final_b), &f);
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            result = Py_None;
            Py_INCREF(result);
        } else {
            errno = f.err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, f.path == dir_path ? dir_str : tmp_str);
        }
    } else {
        close(fd); /* the contract: fd is closed whatever happens */
    }
    Py_XDECREF(dir_b);
    Py_XDECREF(tmp_b);
    Py_XDECREF(final_b);
    return result;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n > (1 << 23) ? (1 << 23) : n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int write_file(const char *dir_path, const char *tmp_path, const char *final_path, const char *data,
                      size_t len, const char *xname, const char *xvalue, size_t xlen, int *xerr, failure *f) {
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
        if (mkdir(dir_path, 0755) != 0 && errno != EEXIST) {
            f->err = errno;
            f->path = dir_path;
            return -1;
        }
        fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        f->err = errno;
        f->path = dir_path;
        return -1;
    }
    if (flock(fd, LOCK_EX) != 0 || write_all(fd, data, len) != 0) {
        f->err = errno;
        f->path = tmp_path;
        close(fd);
        unlink(tmp_path);
        return -1;
    }
    if (xvalue && fsetxattr(fd, xname, xvalue, xlen, 0) != 0) *xerr = errno;
    if (commit(fd, dir_path, tmp_path, final_path, f) != 0) {
        unlink(tmp_path);
        return -1;
    }
    return 0;
}

static PyObject *write_block(PyObject *module, PyObject *args) {
    PyObject *dir_str, *tmp_str, *final_str, *xname_str;
    Py_buffer data, xvalue = {0};
    PyObject *xvalue_obj;
    if (!PyArg_ParseTuple(args, "UUUy*UO", &dir_str, &tmp_str, &final_str, &data, &xname_str, &xvalue_obj))
        return NULL;
    PyObject *result = NULL, *dir_b = NULL, *tmp_b = NULL, *final_b = NULL, *xname_b = NULL;
    int have_x = xvalue_obj != Py_None;
    if (have_x && PyObject_GetBuffer(xvalue_obj, &xvalue, PyBUF_SIMPLE) < 0) goto done;
    dir_b = PyUnicode_EncodeFSDefault(dir_str);
    tmp_b = dir_b ? PyUnicode_EncodeFSDefault(tmp_str) : NULL;
    final_b = tmp_b ? PyUnicode_EncodeFSDefault(final_str) : NULL;
    xname_b = final_b ? PyUnicode_EncodeFSDefault(xname_str) : NULL;
    if (xname_b) {
        failure f = {0, NULL};
        int xerr = 0, rc;
        const char *dir_path = PyBytes_AS_STRING(dir_b);
        Py_BEGIN_ALLOW_THREADS
        rc = write_file(dir_path, PyBytes_AS_STRING(tmp_b), PyBytes_AS_STRING(final_b), data.buf, (size_t)data.len,
                        PyBytes_AS_STRING(xname_b), have_x ? xvalue.buf : NULL, have_x ? (size_t)xvalue.len : 0,
                        &xerr, &f);
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            result = PyLong_FromLong(xerr);
        } else {
            errno = f.err;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, f.path == dir_path ? dir_str : tmp_str);
        }
    }
done:
    if (have_x && xvalue.obj) PyBuffer_Release(&xvalue);
    PyBuffer_Release(&data);
    Py_XDECREF(dir_b);
    Py_XDECREF(tmp_b);
    Py_XDECREF(final_b);
    Py_XDECREF(xname_b);
    return result;
}

static PyMethodDef methods[] = {
    {"write_block", write_block, METH_VARARGS,
     "write_block(dir_path, tmp_path, final_path, data, xattr_name, xattr_value): the whole durable write of an "
     "in-memory block (see the module source). Returns 0 or the errno of a failed setxattr."},
    {"finish_block", finish_block, METH_VARARGS,
     "finish_block(fd, dir_path, tmp_path, final_path): mtime = now, fsync, close, rename under the directory's "
     "flock, fsync the directory (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "keepstore._fileio", "The durable end of a block write, without the GIL.", -1, methods,
};

PyMODINIT_FUNC PyInit__fileio(void) { return PyModule_Create(&moduledef); }
