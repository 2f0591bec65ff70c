/*
 * writable.c - the image under an overlay (docs/behaviour.md, 'Runtime: writable
 * containers').
 *
 * The overlay's lower layer is the image mount (read-only: squashfs, or xfs mounted
 * ro,norecovery), so the image file is never written.  Its upper layer is a directory of
 * a tmpfs of the size the site allows, nosuid,nodev, which only the overlay holds: it is
 * attached at loopMount just while the overlay is made (overlayfs takes private clones
 * of its layers) and detached at once, so the layer and its memory go with the overlay
 * (with run's mount namespace, or shifter-setup's teardown).  The overlay is
 * nosuid,nodev; container.c binds its directories read-only unless --writable-tmpfs.
 * A --local root is never put under an overlay: a layer is one mount, and the files
 * that the mounts inside a --local tree hide would show through it.
 */
#define _GNU_SOURCE
#include "writable.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mnt.h"
#include "util.h"

#define DEFAULT_LIMIT (1ULL << 30)   /* writableTmpfsSizeLimit unset */
#define POINTS_ONLY (1ULL << 20)     /* no --writable-tmpfs: room for mount points only */
#define BYTES_PER_INODE 8192         /* files on the layer: its size / this (slab is memory) */

void writable_check(struct ctx *c, const char *size)
{
    const char *limit = conf_get(c->conf, "writableTmpfsSizeLimit");
    char err[VOL_ERR_LEN];
    uint64_t want, max = DEFAULT_LIMIT;

    if (!config_flag(conf_get(c->conf, "allowWritableTmpfs"), 0))
        die_user("--writable-tmpfs is not allowed on this system (allowWritableTmpfs=0)");
    if (c->local_path != NULL)
        die_user("--writable-tmpfs works with images only, not with --local");
    if (limit != NULL && *limit != '\0' && vol_parse_size(limit, &max, err, sizeof err) != 0)
        die("FAILED to parse udiRoot configuration. (writableTmpfsSizeLimit: %s)", err);
    if (vol_parse_size(size, &want, err, sizeof err) != 0 || want == 0)
        die_user("Invalid --writable-tmpfs size %s: give a size such as 512M", size);
    if (want > max)
        die_user("--writable-tmpfs of %llu bytes is over the site limit of %llu bytes "
                 "(writableTmpfsSizeLimit)", (unsigned long long)want, (unsigned long long)max);
    c->writable_size = want;
}

static int merged_top(const char *name)
{
    return strcmp(name, "etc") == 0 || strcmp(name, "var") == 0 || strcmp(name, "opt") == 0;
}

/*
 * Whether volume target path needs a mount point made inside an image directory (1) or
 * not (0: it exists, or the container root will hold it, or volmount.c's resolution
 * decides).  The entry that holds it in the container (its first component, or the
 * second below the merged etc, var, opt) must be the image's: a site entry of that name
 * wins over the image's (container.c).  The image part is walked in img one component at
 * a time, beneath img and on its mount, following no symbolic link, so no link of the
 * image can lead a mkdir elsewhere; a link or a file on the way leaves it to volmount.c.
 * create: make the missing directories (root's, 0755) as it goes.  file: the last
 * component is a file (a CDI mount of one, gpu.c): made empty, root's, 0644.
 */
static int image_mount_point(const struct ctx *c, int img, const char *path, int create,
                             int file)
{
    const unsigned long long how = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                                   RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
    char rel[HELPER_MAX_PATH];
    size_t n = 0;
    int depth = 0, own = 0, fd, is_file;
    struct stat st;

    for (const char *p = path + strspn(path, "/"); *p; p += strspn(p, "/")) {
        size_t len = strcspn(p, "/");
        if (n + len + 2 > sizeof rel)
            return 0; /* too long: volmount.c says so */
        n += (size_t)snprintf(rel + n, sizeof rel - n, "%s%.*s", n ? "/" : "", (int)len, p);
        p += len;
        depth++;
        if (!own && fstatat(c->root, rel, &st, AT_SYMLINK_NOFOLLOW) != 0)
            own = depth; /* the image's entry (or none: the root will hold it) */
        else if (!own && (depth > 1 || !S_ISDIR(st.st_mode) || !merged_top(rel)))
            return 0;    /* the site's entry */
        is_file = file && p[strspn(p, "/")] == '\0'; /* the last one, that file */
        fd = openat2_resolve(img, rel, O_PATH | (is_file ? 0 : O_DIRECTORY) | O_CLOEXEC, how);
        if (fd >= 0) {
            close(fd);
            continue;
        }
        if (errno != ENOENT || !own || depth == own)
            return 0; /* a link or a file on the way, or the root holds it */
        if (!create)
            return 1;
        /* Its parent was just reached with no link, and only we write the overlay. */
        if (is_file && (fd = openat(img, rel, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                                    O_CLOEXEC, 0644)) >= 0)
            close(fd);
        else if (is_file || mkdirat(img, rel, 0755) != 0)
            die_errno("Cannot make the mount point /%s in the image overlay", rel);
    }
    return 0;
}

/* The overlay over image (attached at loopMount), its upper layer a fresh tmpfs. */
static int overlay(struct ctx *c, int image)
{
    uint64_t size = c->writable_size ? c->writable_size : POINTS_ONLY;
    uint64_t inodes = size / BYTES_PER_INODE < 4096 ? 4096 : size / BYTES_PER_INODE;
    int loop = open(c->loop, O_PATH | O_DIRECTORY | O_CLOEXEC), up, ovl;
    char opts[192], link[32];

    if (loop < 0)
        die_errno("Cannot open loopMount %s", c->loop);
    snprintf(opts, sizeof opts, "size=%llu,nr_inodes=%llu,mode=0700",
             (unsigned long long)size, (unsigned long long)inodes);
    up = mnt_new("tmpfs", "shifter-writable", opts, ATTR_NOSUID | ATTR_NODEV,
                 "the writable layer");
    mnt_attach(up, loop, MS_PRIVATE, "the writable layer");
    mkdir_at(up, "upper", 0755);
    mkdir_at(up, "work", 0700);
    snprintf(opts, sizeof opts,
             "lowerdir=/proc/self/fd/%d,upperdir=/proc/self/fd/%d/upper,"
             "workdir=/proc/self/fd/%d/work", image, up, up);
    ovl = mnt_new("overlay", "shifter", opts, ATTR_NOSUID | ATTR_NODEV, "the image overlay");
    /* The overlay holds its own clone of the layer: this one goes now. */
    if (umount2(fd_path(up, link, sizeof link), MNT_DETACH) != 0)
        die_errno("Cannot detach the writable layer");
    close(up);
    mnt_attach(ovl, loop, MS_PRIVATE, "the image overlay");
    close(loop);
    return ovl;
}

int writable_image(struct ctx *c, int image)
{
    int need = c->writable_size != 0, ovl;

    if (c->local_path != NULL)
        return image;
    for (size_t i = 0; i < c->vols.n && !need; i++)
        need = image_mount_point(c, image, c->vols.vol[i].target, 0, 0);
    for (size_t i = 0; i < c->gpu.n_mounts && !need; i++)
        need = image_mount_point(c, image, c->gpu.mounts[i].target, 0, !c->gpu.mounts[i].dir);
    if (!need)
        return image;
    ovl = overlay(c, image);
    close(image);
    for (size_t i = 0; i < c->vols.n; i++)
        image_mount_point(c, ovl, c->vols.vol[i].target, 1, 0);
    for (size_t i = 0; i < c->gpu.n_mounts; i++)
        image_mount_point(c, ovl, c->gpu.mounts[i].target, 1, !c->gpu.mounts[i].dir);
    if (c->writable_size == 0)
        mnt_set(ovl, 0, ATTR_RO, 0, "the image overlay");
    verbose("image overlay (%s)", c->writable_size ? "writable" : "mount points");
    return ovl;
}
