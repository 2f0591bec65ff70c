/*
 * mnt.h - mount primitives on file descriptors (new mount API: fsopen,
 * fsmount, open_tree, mount_setattr, move_mount).  Every mount is made
 * detached, given its flags (nosuid, nodev, ro) and only then attached, so
 * nothing is ever visible without its flags; both ends are file descriptors,
 * so what was checked is what is mounted.
 */
#ifndef SHIFTER_HELPERS_MNT_H
#define SHIFTER_HELPERS_MNT_H

#include <stddef.h>
#include <stdint.h>

#define ATTR_RO 0x1
#define ATTR_NOSUID 0x2
#define ATTR_NODEV 0x4
#define ATTR_NOEXEC 0x8

/* A new filesystem (type, source or NULL, options "k=v,flag" or NULL); returns a detached
 * mount fd with attrs set.  what names it in messages. */
int mnt_new(const char *type, const char *source, const char *options, unsigned attrs,
            const char *what);

/* A detached copy of the mount at src_fd (recursive when rec) with attrs set recursively. */
int mnt_clone(int src_fd, int rec, unsigned attrs, const char *what);

/* Attach detached mount mfd on dst_fd; propagation 0, MS_PRIVATE or MS_SLAVE. */
void mnt_attach(int mfd, int dst_fd, unsigned long propagation, const char *what);

/* Set (recursively when rec) attrs on an attached mount. */
void mnt_set(int mfd, int rec, unsigned attrs, unsigned long propagation, const char *what);

/* Clear attrs on an attached mount (not recursive). */
void mnt_clear(int mfd, unsigned attrs, const char *what);

/* Create the mount point dst_dir/name (a directory of mode dir_mode when is_dir, else an
 * empty file; a directory may already exist, a file must not) and return it O_PATH. */
int mnt_point_at(int dst_dir, const char *name, int is_dir, unsigned dir_mode);

/* Bind src_dir/name (not followed if a symlink) with the mounts below it, read-only
 * (unless writable), nosuid, nodev, onto a new mount point dst_dir/name (a directory when
 * is_dir, else an empty file; it must not exist), all private. */
void mnt_bind_at(int src_dir, const char *name, int dst_dir, int is_dir, int writable);

/* Detach (MNT_DETACH) every mount stacked on each root with its whole subtree, naming
 * only the roots (canonical, root's paths), never a path below them.  What stays mounted
 * below a root that is not itself a mount point is hidden by the next container mounted
 * there; shifter-setup reports it (teardown.c). */
void mnt_detach_roots(const char *const roots[], int n);

/* The mount id of fd (statx STATX_MNT_ID); dies on failure. */
uint64_t mnt_id(int fd);

#endif
