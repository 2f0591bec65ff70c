/*
 * mnt.c - mounts by file descriptor.  See mnt.h.
 */
#define _GNU_SOURCE
#include "mnt.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#define MAX_MOUNTS 4096

static uint64_t to_mount_attr(unsigned attrs)
{
    uint64_t a = 0;

    if (attrs & ATTR_RO)
        a |= MOUNT_ATTR_RDONLY;
    if (attrs & ATTR_NOSUID)
        a |= MOUNT_ATTR_NOSUID;
    if (attrs & ATTR_NODEV)
        a |= MOUNT_ATTR_NODEV;
    if (attrs & ATTR_NOEXEC)
        a |= MOUNT_ATTR_NOEXEC;
    return a;
}

int mnt_new(const char *type, const char *source, const char *options, unsigned attrs,
            const char *what)
{
    int fs = fsopen(type, FSOPEN_CLOEXEC), mfd;

    if (fs < 0)
        die_errno("Cannot mount %s: filesystem type %s", what, type);
    if (source != NULL && fsconfig(fs, FSCONFIG_SET_STRING, "source", source, 0) != 0)
        die_errno("Cannot mount %s from %s", what, source);
    if (options != NULL) {
        char *opts = xstrdup(options), *save = NULL;
        for (char *o = strtok_r(opts, ",", &save); o != NULL; o = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(o, '=');
            int rc;
            if (eq != NULL) {
                *eq = '\0';
                rc = fsconfig(fs, FSCONFIG_SET_STRING, o, eq + 1, 0);
            } else {
                rc = fsconfig(fs, FSCONFIG_SET_FLAG, o, NULL, 0);
            }
            if (rc != 0)
                die_errno("Cannot mount %s: option %s", what, o);
        }
        free(opts);
    }
    if (fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) != 0)
        die_errno("Cannot mount %s (%s)", what, type);
    mfd = fsmount(fs, FSMOUNT_CLOEXEC, (unsigned)to_mount_attr(attrs));
    if (mfd < 0)
        die_errno("Cannot mount %s (%s)", what, type);
    close(fs);
    return mfd;
}

int mnt_clone(int src_fd, int rec, unsigned attrs, const char *what)
{
    int mfd = open_tree(src_fd, "",
                        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH |
                            (rec ? AT_RECURSIVE : 0));
    struct mount_attr attr;

    if (mfd < 0)
        die_errno("Cannot bind %s", what);
    memset(&attr, 0, sizeof attr);
    attr.attr_set = to_mount_attr(attrs);
    if (attr.attr_set != 0 &&
        mount_setattr(mfd, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr, sizeof attr) != 0)
        die_errno("Cannot set mount flags on %s", what);
    return mfd;
}

void mnt_set(int mfd, int rec, unsigned attrs, unsigned long propagation, const char *what)
{
    struct mount_attr attr;

    memset(&attr, 0, sizeof attr);
    attr.attr_set = to_mount_attr(attrs);
    attr.propagation = propagation;
    if (mount_setattr(mfd, "", AT_EMPTY_PATH | (rec ? AT_RECURSIVE : 0), &attr, sizeof attr) !=
        0)
        die_errno("Cannot set mount flags on %s", what);
}

void mnt_clear(int mfd, unsigned attrs, const char *what)
{
    struct mount_attr attr;

    memset(&attr, 0, sizeof attr);
    attr.attr_clr = to_mount_attr(attrs);
    if (mount_setattr(mfd, "", AT_EMPTY_PATH, &attr, sizeof attr) != 0)
        die_errno("Cannot clear mount flags on %s", what);
}

void mnt_attach(int mfd, int dst_fd, unsigned long propagation, const char *what)
{
    if (move_mount(mfd, "", dst_fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0)
        die_errno("Cannot mount %s", what);
    if (propagation != 0)
        mnt_set(mfd, 0, 0, propagation, what);
}

int mnt_point_at(int dst_dir, const char *name, int is_dir, unsigned dir_mode)
{
    int dst;

    if (is_dir) {
        mkdir_at(dst_dir, name, (mode_t)dir_mode);
    } else {
        int f = openat(dst_dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (f < 0)
            die_errno("Cannot create mount point for %s", name);
        close(f);
    }
    dst = openat(dst_dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (dst < 0)
        die_errno("Cannot open mount point %s", name);
    return dst;
}

void mnt_bind_at(int src_dir, const char *name, int dst_dir, int is_dir, int writable)
{
    int src = openat(src_dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    int dst, mfd;

    if (src < 0)
        die_errno("Cannot open %s", name);
    dst = mnt_point_at(dst_dir, name, is_dir, 0755);
    /* Recursive: a --local root's directories show what is mounted in them, never the
     * files hidden under those mount points; flags and privacy all the way down (a
     * copy of a shared host mount would otherwise pass our unmounts on to the host). */
    mfd = mnt_clone(src, 1, (writable ? 0 : ATTR_RO) | ATTR_NOSUID | ATTR_NODEV, name);
    mnt_attach(mfd, dst, 0, name);
    mnt_set(mfd, 1, 0, MS_PRIVATE, name);
    close(mfd);
    close(dst);
    close(src);
}

uint64_t mnt_id(int fd)
{
    struct statx stx;

    if (statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_MNT_ID, &stx) != 0 ||
        !(stx.stx_mask & STATX_MNT_ID))
        die_errno("Cannot read the mount id of a directory");
    return stx.stx_mnt_id;
}

void mnt_detach_roots(const char *const roots[], int np)
{
    /*
     * Only the roots themselves are named, never a path below them: those run through
     * the user's volumes, where a middle component can be swapped for a symlink between
     * reading mountinfo and the call, and root would detach whatever it then leads to.
     * The roots are canonical paths of root's config.  A lazy unmount of a root takes
     * its whole subtree; one call per mount stacked on the root.  Nothing propagates
     * out: every mount of the container is private or a slave of the host's.
     */
    for (int i = 0; i < np; i++) {
        for (int k = 0; k < MAX_MOUNTS; k++) {
            if (umount2(roots[i], MNT_DETACH | UMOUNT_NOFOLLOW) == 0)
                continue;
            if (errno != EINVAL) /* EINVAL: no (more) mount at the root */
                warn("shifter-helper: could not unmount %s: %s", roots[i], strerror(errno));
            break;
        }
    }
}
