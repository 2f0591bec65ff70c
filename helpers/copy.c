/*
 * copy.c - file and tree copies by directory fd.  Sources are opened with
 * O_NOFOLLOW and checked with fstat on the opened fd; destinations are created
 * with O_EXCL|O_NOFOLLOW after removing what was there, so a planted symlink
 * can never redirect a write.  Data moves with sendfile (in-kernel).
 *
 * Trees (optUdiImage, module copyPaths, etcPath subdirectories) are root's: a file
 * over 64 KiB there that is root-owned, not group/other writable, without set-id bits and
 * already readable (and, if executable, executable) by all is bind-mounted read-only
 * instead of copied.  Copying an MPI module (48 MiB) or the sshd tree (16 MiB) into
 * every container cost 7-26 ms per launch; a bind costs microseconds and shows the
 * same bytes with the same a+rX mode the copy would have had.  (64 KiB: below it a copy
 * into the tmpfs is about as cheap as a mount, and keeps the mount table short.)
 */
#define _GNU_SOURCE
#include "copy.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mnt.h"
#include "util.h"

#define MAX_DEPTH 64
#define TREE_BIND_OVER (64 * 1024)

static void copy_data(int in, int out, off_t size, const char *name)
{
    /* sendfile: in-kernel, and unlike copy_file_range it crosses filesystem types. */
    for (off_t done = 0; done < size;) {
        ssize_t n = sendfile(out, in, NULL, (size_t)(size - done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die_errno("Cannot copy %s", name);
        if (n == 0)
            break; /* the file shrank */
        done += n;
    }
}

int copy_fd_at(int in, const char *name, int dst_dir, const char *dst_name, mode_t mode,
               int keep_existing)
{
    struct stat st;
    int out;

    if (fstat(in, &st) != 0)
        die_errno("Cannot stat %s", name);
    if (!S_ISREG(st.st_mode))
        die("Cannot copy %s: not a regular file", name);
    if (mode == 0)
        mode = st.st_mode & 0777; /* set-id and sticky bits dropped */
    if (!keep_existing && unlinkat(dst_dir, dst_name, 0) != 0 && errno != ENOENT)
        die_errno("Cannot replace %s", dst_name);
    out = openat(dst_dir, dst_name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                 mode);
    if (out < 0 && keep_existing && errno == EEXIST)
        return 1;
    if (out < 0)
        die_errno("Cannot create %s", dst_name);
    copy_data(in, out, st.st_size, name);
    if (fchmod(out, mode) != 0)
        die_errno("Cannot set the mode of %s", dst_name);
    if (close(out) != 0)
        die_errno("Cannot write %s", dst_name);
    return 0;
}

int copy_file_at(int src_dir, const char *name, int dst_dir, const char *dst_name,
                 mode_t mode, int keep_existing)
{
    int in = openat(src_dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    int rc;

    if (in < 0)
        die_errno("Cannot open %s", name);
    rc = copy_fd_at(in, name, dst_dir, dst_name, mode, keep_existing);
    close(in);
    return rc;
}

void copy_symlink_at(int src_dir, const char *name, int dst_dir, const char *dst_name)
{
    char target[HELPER_MAX_PATH];
    ssize_t n = readlinkat(src_dir, name, target, sizeof target);

    if (n < 0)
        die_errno("Cannot read symlink %s", name);
    if ((size_t)n >= sizeof target)
        die("Cannot copy symlink %s: target too long", name);
    target[n] = '\0';
    if (symlinkat(target, dst_dir, dst_name) != 0) {
        if (errno != EEXIST)
            die_errno("Cannot create symlink %s", dst_name);
        if (unlinkat(dst_dir, dst_name, 0) != 0 || symlinkat(target, dst_dir, dst_name) != 0)
            die_errno("Cannot replace %s with a symlink", dst_name);
    }
}

/* A file tree() may bind rather than copy (see the top of this file). */
static int bindable(const struct stat *st)
{
    mode_t m = st->st_mode;

    return st->st_size > TREE_BIND_OVER && st->st_uid == 0 && (m & 0022) == 0 &&
           (m & 06000) == 0 && (m & 0444) == 0444 && ((m & 0111) == 0 || (m & 0111) == 0111);
}

static void tree(int src, int dst, const char *what, int a_rx, int depth)
{
    int rfd;
    DIR *d;
    struct dirent *e;

    if (depth > MAX_DEPTH)
        die("Cannot copy %s: more than %d levels deep", what, MAX_DEPTH);
    rfd = openat(src, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (rfd < 0 || (d = fdopendir(rfd)) == NULL)
        die_errno("Cannot read %s", what);
    while ((errno = 0, e = readdir(d)) != NULL) {
        struct stat st;

        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (fstatat(rfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            die_errno("Cannot stat %s in %s", e->d_name, what);
        if (S_ISREG(st.st_mode) && bindable(&st)) {
            if (unlinkat(dst, e->d_name, 0) != 0 && errno != ENOENT)
                die_errno("Cannot replace %s in %s", e->d_name, what);
            mnt_bind_at(rfd, e->d_name, dst, 0, 0);
        } else if (S_ISREG(st.st_mode)) {
            mode_t m = st.st_mode & 0777; /* a+rX: x for all when anyone may execute */
            copy_file_at(rfd, e->d_name, dst, e->d_name,
                         a_rx ? m | 0444 | (m & 0111 ? 0111 : 0) : 0, 0);
        } else if (S_ISLNK(st.st_mode)) {
            copy_symlink_at(rfd, e->d_name, dst, e->d_name);
        } else if (S_ISDIR(st.st_mode)) {
            int s, t;
            mkdir_at(dst, e->d_name, (st.st_mode & 0777) | (a_rx ? 0555 : 0));
            s = open_dir_at(rfd, e->d_name);
            t = open_dir_at(dst, e->d_name);
            if (s < 0 || t < 0)
                die_errno("Cannot open directory %s in %s", e->d_name, what);
            tree(s, t, what, a_rx, depth + 1);
            close(s);
            close(t);
        }
    }
    if (errno != 0)
        die_errno("Cannot read %s", what);
    closedir(d);
}

void copy_tree(int src, int dst, const char *what, int a_rx)
{
    tree(src, dst, what, a_rx, 0);
}
