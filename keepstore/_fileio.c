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
 * ``final_path``, closes ``fd`` (always closed, whatever fails) and fsyncs the directory. Raises OSError (errno,
 * message, the path concerned) at the first failure; the temp file is left for the caller to remove.
 *
 *   write_block(dir_path, tmp_path, final_path, data, xattr_name, xattr_value, direct=False, sync_parent=False)
 *
 * is the whole write of a block that is in memory: create ``tmp_path`` (O_EXCL, mode 0600; the directory is created
 * if missing, and then, or with ``sync_parent``, its parent is fsynced: see sync_parent), flock it (a live writer's
 * mark, see the start-up sweep), write ``data``, set the xattr if ``xattr_value`` is not None (a hint: failures are
 * ignored but reported), then finish_block. Removes the temp file on any failure. Returns 0, or the errno of a
 * failed setxattr. With ``direct`` true the data is written with O_DIRECT where it can be (see write_data below).
 *
 *   append(fd, data, direct=False)
 *
 * writes all of ``data`` at ``fd``'s offset (a block arriving in pieces), with O_DIRECT as above if ``direct``.
 * Returns how many of its bytes, at the end, went through the page cache (the caller may start their writeback).
 *
 *   birth_ns(fd)
 *
 * is the file's creation time (statx(2) btime) in nanoseconds, or None where the file system does not record it.
 *
 *   write_group(root_fd, items)
 *
 * is group commit: the durable write of several in-memory blocks at once, ``items`` being a list of
 * (dir_path, tmp_path, final_path, data, xattr_name, xattr_value) tuples. Each temp file is created, locked and
 * written as by write_block, without an fsync; then one syncfs(2) of the file system that holds ``root_fd``
 * (through a descriptor opened for the group: see commit_group) makes all of them durable at once; then each is
 * renamed into place under its directory's flock; then a second syncfs makes the renames durable. A block
 * therefore becomes visible only once its data is on disk, as with write_block, and the call returns only once
 * every rename is on disk too. Two syncfs calls cost far less than an fsync of every
 * file and of every directory (on this class of machine about 2.5 times the files per second for the same CPU).
 * Where a syncfs fails (it reports writeback errors since Linux 5.8: the caller checks), the blocks it covered are
 * fsynced one by one (files), or their directories are (renames), so that each error lands on the block it hit.
 * Returns one entry per item, in order: the int write_block would return, or the OSError it would raise (the temp
 * file removed; a block whose rename was done but whose directory fsync failed stays in place, as write_block
 * leaves it).
 *
 *   write_group(root_fd, items, True)
 *
 * (``if_absent``) writes nothing for a block that is already there, and renames no temp file over one that appears
 * meanwhile (renameat2 RENAME_NOREPLACE, or link + unlink where the file system lacks it; the temp file is then
 * removed): either way the block's entry is None, and the caller compares the stored copy and touches it. A group
 * of stored blocks only does no syncfs at all. This is the existence check of a PUT, done here, where the write
 * happens, instead of a stat on the caller's event loop (for a new block the lookup searches the directory, from
 * disk if its blocks are not cached).
 *
 *   write_group(root_fd, items, if_absent, (journal_fd, offset, headers))
 *
 * commits the group through a write-ahead journal instead (keepstore.volumes.journal): the data of every block to
 * be written, each after its 64-byte record header from ``headers`` (one bytes object per item) and padded to 64
 * bytes, is written to ``journal_fd`` at ``offset`` and made durable with one fdatasync (records are written for
 * blocks already there too, so that the records stay contiguous; a group of such blocks only is not fdatasynced);
 * then the temp files are written and renamed into place as above, with no syncfs. A block is thus visible only once its data is on disk
 * (in the journal: start-up recovery rewrites from it any block file a crash left incomplete), and durable when
 * the call returns; the block files themselves become durable at the journal's next checkpoint (a syncfs). One
 * sequential write and one flush take the place of the two syncfs calls, which write every new file's inode,
 * bitmaps and directory blocks (8-10 device writes per file on ext4) before the client may be answered. Returns
 * (entries, errno): errno 0, or that of the failed journal write or fdatasync, in which case the group was
 * committed the two-syncfs way instead (the entries are right either way).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <limits.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int err;
    const char *path;
} failure;

/* Make a directory's own entry durable: fsync its parent. The fsyncs of a block and of its directory do not cover
 * the parent's entry, and without it a power cut can take away the directory and every block acknowledged inside
 * it. Done after every mkdir on the way to a block, EEXIST included, and (write_block's ``sync_parent``) for the
 * first write of a process into a directory it has not seen made durable, if that directory is young (above):
 * another thread or process may have made it a moment ago and not synced its parent yet
 * (keepstore.volumes.directory keeps the set of those it has seen). In a group (stage below) the mkdir case only:
 * the group's syncfs covers the rest, and this covers its fallback. */
/* Whether a directory was made less than YOUNG_DIR_NS ago, or its age is unknown: its maker (which syncs the
 * parent right after its mkdir) may still be at it. Older ones were synced by their maker, or by the start of the
 * process that came after a maker that died first (keepstore.volumes.directory syncs the root at start). */
#define YOUNG_DIR_NS (60LL * 1000000000LL)
static int dir_is_young(const char *dir_path) {
    struct statx st;
    if (statx(AT_FDCWD, dir_path, 0, STATX_BTIME, &st) != 0 || !(st.stx_mask & STATX_BTIME)) return 1;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    long long born = (long long)st.stx_btime.tv_sec * 1000000000LL + st.stx_btime.tv_nsec;
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec - born < YOUNG_DIR_NS;
}

static int sync_parent(const char *dir_path) {
    char parent[PATH_MAX];
    const char *slash = strrchr(dir_path, '/');
    size_t len = slash == NULL ? 0 : (size_t)(slash - dir_path);
    if (slash == NULL) {
        strcpy(parent, ".");
    } else if (len == 0) {
        strcpy(parent, "/");
    } else if (len >= sizeof parent) {
        errno = ENAMETOOLONG;
        return -1;
    } else {
        memcpy(parent, dir_path, len);
        parent[len] = '\0';
    }
    int dfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return -1;
    int rc = fsync(dfd), err = errno;
    close(dfd);
    errno = err;
    return rc;
}

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

/* Writes n bytes at the file offset, in pieces of at most 8 MiB; *done says how many went out, even on failure. */
static int write_all_n(int fd, const char *p, size_t n, size_t *done) {
    *done = 0;
    while (n) {
        ssize_t w = write(fd, p, n > (1 << 23) ? (1 << 23) : n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) { /* a device that takes nothing: report it as full rather than spin */
            errno = ENOSPC;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        *done += (size_t)w;
    }
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    size_t done;
    return write_all_n(fd, p, n, &done);
}

/* write_all, with the aligned part of the data written with O_DIRECT when ``direct`` is set and the buffer allows it.
 *
 * Why: a buffered write copies every byte into freshly allocated page-cache pages and leaves them dirty for fsync
 * to write out; for large blocks that copy is most of the CPU a PUT costs (here ~4 ms of kernel time per MiB,
 * against ~0.1 ms direct) and the dirty pages push writers into writeback throttling. O_DIRECT hands the pages of
 * our buffer to the device instead. Durability is unchanged: the caller still fsyncs (file size and extents), and
 * the file becomes visible only after that, by rename.
 *
 * O_DIRECT needs the buffer address, the file offset and the length aligned (to the device's logical block size;
 * DIRECT_ALIGN covers every common device). The unaligned tail, an unaligned buffer, or a file system that refuses
 * O_DIRECT (EINVAL from fcntl or from the write: tmpfs before Linux 6.6, some FUSE and network file systems) are
 * written buffered, from wherever the direct part stopped. Either way the file holds exactly the bytes given.
 * Returns -1 (errno set) on failure, else how many of the bytes (at the end of the data) went buffered. */
#define DIRECT_ALIGN 4096

static ssize_t write_data(int fd, const char *p, size_t n, int direct) {
    if (direct && n >= DIRECT_ALIGN && ((uintptr_t)p % DIRECT_ALIGN) == 0) {
        off_t pos = lseek(fd, 0, SEEK_CUR);
        int flags = fcntl(fd, F_GETFL);
        if (pos >= 0 && pos % DIRECT_ALIGN == 0 && flags >= 0 && fcntl(fd, F_SETFL, flags | O_DIRECT) == 0) {
            size_t head = n - n % DIRECT_ALIGN, done;
            int rc = write_all_n(fd, p, head, &done);
            int err = errno;
            fcntl(fd, F_SETFL, flags); /* back to buffered writes: the tail, and whatever the caller does next */
            if (rc != 0 && err != EINVAL) {
                errno = err;
                return -1;
            }
            p += done;
            n -= done;
        }
    }
    return write_all(fd, p, n) != 0 ? -1 : (ssize_t)n;
}

static int write_file(const char *dir_path, const char *tmp_path, const char *final_path, const char *data,
                      size_t len, int direct, int sync_dir_entry, const char *xname, const char *xvalue, size_t xlen,
                      int *xerr, failure *f) {
    int made = 0, fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
        if (mkdir(dir_path, 0755) != 0 && errno != EEXIST) {
            f->err = errno;
            f->path = dir_path;
            return -1;
        }
        made = 1;  /* synced whatever its age: it may be this thread's */
        fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        f->err = errno;
        f->path = dir_path;
        return -1;
    }
    int failed = flock(fd, LOCK_EX) != 0;  /* first: an unlocked temp file is a dead writer's (start-up sweep) */
    f->path = tmp_path;
    if (!failed && (made || (sync_dir_entry && dir_is_young(dir_path))) && sync_parent(dir_path) != 0) {
        failed = 1;
        f->path = dir_path;
    }
    if (!failed && write_data(fd, data, len, direct) < 0) {
        failed = 1;
        f->path = tmp_path;
    }
    if (failed) {
        f->err = errno;
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
    int direct = 0, sync_dir_entry = 0;
    if (!PyArg_ParseTuple(args, "UUUy*UO|pp", &dir_str, &tmp_str, &final_str, &data, &xname_str, &xvalue_obj,
                          &direct, &sync_dir_entry))
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
                        direct, sync_dir_entry, PyBytes_AS_STRING(xname_b), have_x ? xvalue.buf : NULL,
                        have_x ? (size_t)xvalue.len : 0,
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

typedef struct {
    Py_buffer data, xvalue;
    int have_x;
    PyObject *dir_str, *tmp_str, *dir_b, *tmp_b, *final_b, *xname_b;
    int fd, xerr, renamed, existed;
    failure f;
} group_item;

static int stage(group_item *it) {
    const char *dir_path = PyBytes_AS_STRING(it->dir_b), *tmp_path = PyBytes_AS_STRING(it->tmp_b);
    int fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
        if ((mkdir(dir_path, 0755) != 0 && errno != EEXIST) || sync_parent(dir_path) != 0) {
            it->f.err = errno;
            it->f.path = dir_path;
            return -1;
        }
        fd = open(tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    }
    if (fd < 0) {
        it->f.err = errno;
        it->f.path = dir_path;
        return -1;
    }
    struct timespec now[2];
    clock_gettime(CLOCK_REALTIME, &now[0]);
    now[1] = now[0];
    if (flock(fd, LOCK_EX) != 0 || write_all(fd, it->data.buf, (size_t)it->data.len) != 0 ||
        futimens(fd, now) != 0) {
        it->f.err = errno;
        it->f.path = tmp_path;
        close(fd);
        unlink(tmp_path);
        return -1;
    }
    if (it->have_x &&
        fsetxattr(fd, PyBytes_AS_STRING(it->xname_b), it->xvalue.buf, (size_t)it->xvalue.len, 0) != 0)
        it->xerr = errno;
    it->fd = fd;
    return 0;
}

static void fail_staged(group_item *it, int err) {
    it->f.err = err;
    it->f.path = PyBytes_AS_STRING(it->tmp_b);
    close(it->fd);
    it->fd = -1;
    unlink(PyBytes_AS_STRING(it->tmp_b));
}

/* rename(2) that fails with EEXIST instead of replacing an existing ``final_path``. */
static int rename_if_absent(const char *tmp_path, const char *final_path) {
    if (renameat2(AT_FDCWD, tmp_path, AT_FDCWD, final_path, RENAME_NOREPLACE) == 0) return 0;
    if (errno != EINVAL && errno != ENOSYS) return -1;
    /* A file system without RENAME_NOREPLACE: link(2) refuses an existing name too. */
    if (link(tmp_path, final_path) != 0) return -1;
    unlink(tmp_path);
    return 0;
}

static void rename_staged(group_item *it, int if_absent) {
    const char *dir_path = PyBytes_AS_STRING(it->dir_b), *tmp_path = PyBytes_AS_STRING(it->tmp_b);
    int dfd = open(dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) {
        int err = errno;
        fail_staged(it, err);
        it->f.path = dir_path;
        return;
    }
    int err = 0;
    while (flock(dfd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            err = errno;
            break;
        }
    }
    if (err == 0) {
        if ((if_absent ? rename_if_absent(tmp_path, PyBytes_AS_STRING(it->final_b))
                       : rename(tmp_path, PyBytes_AS_STRING(it->final_b))) != 0)
            err = errno;
        flock(dfd, LOCK_UN);
    }
    close(dfd);
    if (err == EEXIST && if_absent) {
        close(it->fd);
        it->fd = -1;
        unlink(tmp_path);
        it->existed = 1;
        return;
    }
    if (err != 0) {
        fail_staged(it, err);
        return;
    }
    close(it->fd); /* after the rename: the flock marked a live writer until now */
    it->fd = -1;
    it->renamed = 1;
}

/* syncfs through ``fd``; a descriptor that could not be opened counts as a failed syncfs (the fallbacks run). */
static int sync_through(int fd) { return fd < 0 ? -1 : syncfs(fd); }

static void commit_group(int root_fd, group_item *items, Py_ssize_t n, int if_absent) {
    /* syncfs reports a writeback error once per open file description (the file system's errseq is sampled at open
     * and advanced by each report). Through a descriptor shared with another group (the volume's root_fd, used by
     * every commit thread and inherited by forked workers), an error that hit *this* group's pages could be reported
     * to the other group alone, and this group would be renamed into place as if durable. So each group syncs
     * through a description of its own, opened before it writes anything: every error on its pages is reported to
     * it. (Errors of other writers reported here too only cost the per-file fallback below.) */
    int sfd = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    Py_ssize_t staged = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (if_absent && access(PyBytes_AS_STRING(items[i].final_b), F_OK) == 0) {
            items[i].existed = 1; /* a stored block: nothing to write (the rename below catches one that appears) */
            continue;
        }
        if (stage(&items[i]) == 0) staged++;
    }
    if (!staged) {
        if (sfd >= 0) close(sfd);
        return;
    }
    if (sync_through(sfd) != 0) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (items[i].fd >= 0 && fsync(items[i].fd) != 0) fail_staged(&items[i], errno);
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i].fd >= 0) rename_staged(&items[i], if_absent);
    if (sync_through(sfd) != 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (!items[i].renamed) continue;
            const char *dir_path = PyBytes_AS_STRING(items[i].dir_b);
            int dfd = open(dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (dfd < 0 || fsync(dfd) != 0) {
                items[i].f.err = errno;
                items[i].f.path = dir_path;
                items[i].renamed = 0;
            }
            if (dfd >= 0) close(dfd);
        }
    }
    if (sfd >= 0) close(sfd);
}


#define JOURNAL_ALIGN 64
static const char journal_pad[JOURNAL_ALIGN];

/* pwritev all of ``iov`` at ``offset``, going on after short writes. 0, or -1 with errno set. */
static int pwritev_all(int fd, struct iovec *iov, int iovcnt, off_t offset) {
    while (iovcnt > 0) {
        ssize_t n = pwritev(fd, iov, iovcnt > IOV_MAX ? IOV_MAX : iovcnt, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) {
            errno = EIO;
            return -1;
        }
        offset += n;
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Group commit through the journal (see the module comment). 0, or the errno of the failed journal write or
 * fdatasync: nothing was staged then, and the caller commits the group the two-syncfs way. */
static int commit_journal(group_item *items, Py_ssize_t n, int if_absent, int jfd, off_t offset, Py_buffer *headers) {
    struct iovec *iov = calloc((size_t)n * 3 + 1, sizeof(struct iovec));
    if (!iov) return ENOMEM;
    int cnt = 0, fresh = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* A block that is already there is not staged, but its record is written all the same: the caller
         * reserved room for every item, and a gap in the journal would end a recovery scan there, hiding the
         * records of every later group (a record of a stored block costs recovery a comparison, nothing more). */
        if (if_absent && access(PyBytes_AS_STRING(items[i].final_b), F_OK) == 0)
            items[i].existed = 1;
        else
            fresh++;
        size_t len = (size_t)items[i].data.len, pad = (JOURNAL_ALIGN - len % JOURNAL_ALIGN) % JOURNAL_ALIGN;
        iov[cnt].iov_base = headers[i].buf;
        iov[cnt++].iov_len = (size_t)headers[i].len;
        iov[cnt].iov_base = items[i].data.buf;
        iov[cnt++].iov_len = len;
        if (pad) {
            iov[cnt].iov_base = (void *)journal_pad;
            iov[cnt++].iov_len = pad;
        }
    }
    int err = 0;
    /* Every block there: its records need no fdatasync of their own (nothing is acknowledged on them), and the next
     * group's fdatasync, which covers every dirty page of the file, makes them durable before anything after them. */
    if (cnt > 0 && (pwritev_all(jfd, iov, cnt, offset) != 0 || (fresh && fdatasync(jfd) != 0))) err = errno;
    free(iov);
    if (err) {
        for (Py_ssize_t i = 0; i < n; i++) items[i].existed = 0;
        return err;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!items[i].existed) stage(&items[i]);
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i].fd >= 0) rename_staged(&items[i], if_absent);
    return 0;
}

static void release_item(group_item *it) {
    if (it->data.obj) PyBuffer_Release(&it->data);
    if (it->have_x && it->xvalue.obj) PyBuffer_Release(&it->xvalue);
    Py_XDECREF(it->dir_b);
    Py_XDECREF(it->tmp_b);
    Py_XDECREF(it->final_b);
    Py_XDECREF(it->xname_b);
}

static PyObject *write_group(PyObject *module, PyObject *args) {
    int root_fd, if_absent = 0, jfd = -1, jerr = 0;
    long long joffset = 0;
    PyObject *list, *journal = Py_None, *jheaders = NULL;
    if (!PyArg_ParseTuple(args, "iO!|pO", &root_fd, &PyList_Type, &list, &if_absent, &journal)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (journal != Py_None) {
        if (!PyTuple_Check(journal)) {
            PyErr_SetString(PyExc_TypeError, "journal: a (fd, offset, headers) tuple");
            return NULL;
        }
        if (!PyArg_ParseTuple(journal, "iLO!", &jfd, &joffset, &PyList_Type, &jheaders)) return NULL;
        if (PyList_GET_SIZE(jheaders) != n) {
            PyErr_SetString(PyExc_ValueError, "one journal header per item");
            return NULL;
        }
    }
    group_item *items = calloc(n ? (size_t)n : 1, sizeof(group_item));
    Py_buffer *headers = calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (!items || !headers) {
        free(items);
        free(headers);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_ssize_t ready = 0, nheaders = 0;
    if (jheaders) {
        for (; nheaders < n; nheaders++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(jheaders, nheaders), &headers[nheaders], PyBUF_SIMPLE) < 0) goto done;
            if (headers[nheaders].len != JOURNAL_ALIGN) { /* the record layout the recovery scan reads */
                PyBuffer_Release(&headers[nheaders]);
                PyErr_SetString(PyExc_ValueError, "journal record headers are 64 bytes");
                goto done;
            }
        }
    }
    for (; ready < n; ready++) {
        group_item *it = &items[ready];
        PyObject *final_str, *xname_str, *xvalue_obj;
        it->fd = -1;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, ready), "UUUy*UO", &it->dir_str, &it->tmp_str, &final_str,
                              &it->data, &xname_str, &xvalue_obj))
            goto done;
        it->have_x = xvalue_obj != Py_None;
        if (it->have_x && PyObject_GetBuffer(xvalue_obj, &it->xvalue, PyBUF_SIMPLE) < 0) {
            it->have_x = 0;
            goto done;
        }
        if (!(it->dir_b = PyUnicode_EncodeFSDefault(it->dir_str)) ||
            !(it->tmp_b = PyUnicode_EncodeFSDefault(it->tmp_str)) ||
            !(it->final_b = PyUnicode_EncodeFSDefault(final_str)) ||
            !(it->xname_b = PyUnicode_EncodeFSDefault(xname_str)))
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (jfd >= 0) jerr = commit_journal(items, n, if_absent, jfd, (off_t)joffset, headers);
    if (jfd < 0 || jerr) commit_group(root_fd, items, n, if_absent);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        group_item *it = &items[i];
        PyObject *entry;
        if (it->renamed) {
            entry = PyLong_FromLong(it->xerr);
        } else if (it->existed) {
            entry = Py_NewRef(Py_None);
        } else {
            PyObject *path = it->f.path == PyBytes_AS_STRING(it->dir_b) ? it->dir_str : it->tmp_str;
            entry = PyObject_CallFunction(PyExc_OSError, "isO", it->f.err, strerror(it->f.err), path);
        }
        if (!entry) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, entry);
    }
    if (result && jheaders) {
        PyObject *pair = Py_BuildValue("(Ni)", result, jerr);
        result = pair;
    }
done:
    for (Py_ssize_t i = 0; i < n; i++) release_item(&items[i]);
    for (Py_ssize_t i = 0; i < nheaders; i++) PyBuffer_Release(&headers[i]);
    free(items);
    free(headers);
    return result;
}

static PyObject *birth_ns(PyObject *module, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd)) return NULL;
    struct statx st;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = statx(fd, "", AT_EMPTY_PATH, STATX_BTIME, &st);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        if (errno == ENOSYS || errno == EINVAL) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (!(st.stx_mask & STATX_BTIME)) Py_RETURN_NONE;
    return PyLong_FromLongLong((long long)st.stx_btime.tv_sec * 1000000000LL + st.stx_btime.tv_nsec);
}

static PyObject *append(PyObject *module, PyObject *args) {
    int fd, direct = 0;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "iy*|p", &fd, &data, &direct)) return NULL;
    ssize_t rc;
    int err;
    Py_BEGIN_ALLOW_THREADS
    rc = write_data(fd, data.buf, (size_t)data.len, direct);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(rc);
}

static PyMethodDef methods[] = {
    {"append", append, METH_VARARGS,
     "append(fd, data, direct=False): write all of data at fd's offset, the aligned part with O_DIRECT if direct "
     "(see write_data in the module source). Returns how many bytes, at the end of data, went buffered. Raises "
     "OSError."},
    {"write_group", write_group, METH_VARARGS,
     "write_group(root_fd, items, if_absent=False): group commit of several in-memory blocks with two syncfs calls "
     "(see the module source). Returns, per item, what write_block would return or the OSError it would raise; "
     "with if_absent, None for a block that was already there (nothing written). With a journal (fd, offset, "
     "headers): through the write-ahead journal, returning (entries, errno)."},
    {"birth_ns", birth_ns, METH_VARARGS,
     "birth_ns(fd): when the file was created (statx btime), in nanoseconds, or None where the file system does not "
     "record it. Raises OSError."},
    {"write_block", write_block, METH_VARARGS,
     "write_block(dir_path, tmp_path, final_path, data, xattr_name, xattr_value, direct=False): the whole durable "
     "write of an in-memory block (see the module source). Returns 0 or the errno of a failed setxattr."},
    {"finish_block", finish_block, METH_VARARGS,
     "finish_block(fd, dir_path, tmp_path, final_path): mtime = now, fsync, close, rename under the directory's "
     "flock, fsync the directory (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "keepstore._fileio", "The durable end of a block write, without the GIL.", -1, methods,
};

PyMODINIT_FUNC PyInit__fileio(void) { return PyModule_Create(&moduledef); }
