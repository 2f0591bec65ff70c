/*
 * gpu.c - NVIDIA GPU support.  See gpu.h.
 *
 * devices    /dev/nvidiaN, the control devices and MIG's nvidia-caps/nvidia-capN in
 *            gpuDeviceDir (default /dev), root's domain: the user picks only numbers, each
 *            must name a character device;
 * files      the driver's libraries and tools, found by the front end (udiroot/gpu.py:
 *            the ld.so cache, gpuBinaryPath) and given as --gpu-file DIR/NAME=PATH; each
 *            is opened with the caller's own rights, as a volume source is, and bound
 *            read-only, nosuid, nodev: a caller can only add files they can read;
 * CDI mounts --gpu-mount TARGET=PATH, a CDI spec's mount (the front end reads the specs):
 *            PATH opened as the caller, TARGET a user volume's, bound read-only.
 */
#define _GNU_SOURCE
#include "gpu.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "ctx.h"
#include "copy.h"
#include "mnt.h"
#include "util.h"
#include "volmount.h"
#include "volume.h"

/* Devices every CUDA program needs besides its GPUs; those missing are skipped. */
static const char *const control_devices[] = {
    "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset",
};

static const char *conf_or(const struct udiroot_conf *conf, const char *key, const char *dflt)
{
    const char *v = conf_get(conf, key);
    return v != NULL && *v != '\0' ? v : dflt;
}

/* ---- the request ------------------------------------------------------------------ */

/* Comma-separated distinct numbers below limit into out (at most max of them). */
static int parse_numbers(const char *text, int *out, int *n, int max, long limit,
                         const char *what, char *err, size_t errlen)
{
    const char *p = text;

    *n = 0;
    while (*p) {
        long v = 0;
        int digits = 0;
        while (isdigit((unsigned char)*p) && digits < 8) {
            v = v * 10 + (*p++ - '0');
            digits++;
        }
        if (digits == 0 || (*p != ',' && *p != '\0') || v >= limit)
            return set_err(err, errlen, "Invalid %s list '%.64s': expected device indexes "
                           "from 0 to %ld, such as 0,1", what, text, limit - 1);
        for (int k = 0; k < *n; k++)
            if (out[k] == v)
                return set_err(err, errlen, "Invalid %s list '%.64s': %s %ld given twice",
                               what, text, what, v);
        if (*n >= max)
            return set_err(err, errlen, "Invalid %s list: more than %d", what, max);
        out[(*n)++] = (int)v;
        if (*p == ',' && *++p == '\0')
            return set_err(err, errlen, "Invalid %s list '%.64s': it ends with ','", what, text);
    }
    return *n == 0 ? set_err(err, errlen, "Invalid %s list: it is empty", what) : 0;
}

int gpu_parse(const char *text, struct gpu_plan *g, char *err, size_t errlen)
{
    g->requested = 1;
    return parse_numbers(text, g->sel, &g->n_sel, GPU_MAX, GPU_MAX, "GPU", err, errlen);
}

int gpu_parse_caps(const char *text, struct gpu_plan *g, char *err, size_t errlen)
{
    return parse_numbers(text, g->caps, &g->n_caps, GPU_MAX_CAPS, GPU_CAP_LIMIT, "MIG device",
                         err, errlen);
}

int gpu_add_mount(const char *spec, struct gpu_plan *g, char *err, size_t errlen)
{
    char *target, *eq;

    if (g->n_mounts >= GPU_MAX_MOUNTS)
        return set_err(err, errlen, "More than %d --gpu-mount", GPU_MAX_MOUNTS);
    target = xstrdup(spec);
    eq = strchr(target, '=');
    if (eq != NULL)
        *eq = '\0';
    if (eq == NULL || !is_abs_clean_path(target) || !is_abs_clean_path(eq + 1)) {
        free(target);
        return set_err(err, errlen, "Invalid --gpu-mount '%.256s': expected /TARGET=/SOURCE",
                       spec);
    }
    if (vol_check_user_target(eq + 1, target, err, errlen) != 0) {
        free(target);
        return -1;
    }
    g->mounts[g->n_mounts].target = target;
    g->mounts[g->n_mounts++].source = eq + 1;
    return 0;
}

void gpu_signature(const struct gpu_plan *g, char *buf, size_t len)
{
    size_t n = 0;

    buf[0] = '\0';
    for (int k = 0; k < g->n_sel && n + 4 < len; k++)
        n += (size_t)snprintf(buf + n, len - n, "%s%d", k ? "," : "", g->sel[k]);
}

int gpu_add_file(const char *spec, struct gpu_plan *g, char *err, size_t errlen)
{
    const char *slash = strchr(spec, '/'), *eq = slash ? strchr(slash, '=') : NULL;
    size_t dl = slash ? (size_t)(slash - spec) : 0, nl = eq ? (size_t)(eq - slash - 1) : 0;
    struct gpu_file *f;

    if (g->n_files >= GPU_MAX_FILES)
        return set_err(err, errlen, "More than %d --gpu-file", GPU_MAX_FILES);
    f = &g->files[g->n_files];
    if (eq == NULL || nl == 0 || nl >= sizeof f->name || memchr(slash + 1, '/', nl) != NULL ||
        !((dl == 5 && strncmp(spec, "lib64", 5) == 0) || (dl == 3 && strncmp(spec, "lib", 3) == 0) ||
          (dl == 3 && strncmp(spec, "bin", 3) == 0)) ||
        (nl == 1 && slash[1] == '.') || (nl == 2 && strncmp(slash + 1, "..", 2) == 0) ||
        !is_abs_clean_path(eq + 1))
        return set_err(err, errlen, "Invalid --gpu-file '%.256s': expected "
                       "lib64|lib|bin/NAME=/PATH", spec);
    snprintf(f->dir, sizeof f->dir, "%.*s", (int)dl, spec);
    snprintf(f->name, sizeof f->name, "%.*s", (int)nl, slash + 1);
    for (size_t i = 0; i < g->n_files; i++)
        if (strcmp(g->files[i].dir, f->dir) == 0 && strcmp(g->files[i].name, f->name) == 0)
            return set_err(err, errlen, "--gpu-file %s/%s given twice", f->dir, f->name);
    f->path = eq + 1;
    g->n_files++;
    return 0;
}

/* ---- the devices ----------------------------------------------------------------- */

/* "nvidiaN": returns N, else -1. */
static int gpu_index(const char *name)
{
    char *end;
    long n;

    if (strncmp(name, "nvidia", 6) != 0 || !isdigit((unsigned char)name[6]))
        return -1;
    n = strtol(name + 6, &end, 10);
    return *end == '\0' && n >= 0 && n < GPU_MAX ? (int)n : -1;
}

void gpu_discover(const struct udiroot_conf *conf, struct gpu_plan *g)
{
    const char *sr = conf_or(conf, "siteResources", "/opt/shifter/site-resources");
    const char *dir = conf_or(conf, "gpuDeviceDir", "/dev");
    int fd;

    if (!is_abs_clean_path(sr) || strcmp(sr, "/") == 0 || strlen(sr) >= sizeof g->resources)
        die("FAILED to parse udiRoot configuration. (siteResources must be an absolute "
            "path other than /)");
    snprintf(g->resources, sizeof g->resources, "%s", sr);
    if (!is_abs_clean_path(dir) || strlen(dir) >= sizeof g->dev_dir)
        die("FAILED to parse udiRoot configuration. (gpuDeviceDir must be an absolute path)");
    snprintf(g->dev_dir, sizeof g->dev_dir, "%s", dir);
    fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        die_errno("FAILED to set up GPU support: cannot open the device dir %s", dir);
    for (int k = 0; k < g->n_sel; k++) {
        char name[32];
        struct stat st;
        snprintf(name, sizeof name, "nvidia%d", g->sel[k]);
        if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISCHR(st.st_mode))
            die("FAILED to set up GPU support: GPU %d was requested but this node has no "
                "%s/%s", g->sel[k], dir, name);
    }
    for (int k = 0; k < g->n_caps; k++) {
        char name[48];
        struct stat st;
        snprintf(name, sizeof name, "nvidia-caps/nvidia-cap%d", g->caps[k]);
        if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISCHR(st.st_mode))
            die("FAILED to set up GPU support: MIG device %d was requested but this node has "
                "no %s/%s", g->caps[k], dir, name);
    }
    close(fd);
}

/* ---- mounting ---------------------------------------------------------------------- */

static void bind_fd(int src, int dst, unsigned attrs, int rec, const char *what)
{
    int mfd = mnt_clone(src, rec, attrs, what);

    mnt_attach(mfd, dst, MS_PRIVATE, what);
    close(mfd);
}

/* A copy of the device node dir/name in the container's dev (same type, numbers, owner,
 * mode and POSIX ACL).  Missing nodes are skipped.  The ACL must come along: with one,
 * the group bits of the mode are its mask, not the owning group's rights, so a copy with
 * the mode alone could give the owning group a device the host's ACL denies it. */
static void copy_node(int src_dir, const char *name, int dev)
{
    struct stat st;
    char src[64 + NAME_MAX], dst[64 + NAME_MAX], acl[4096];
    ssize_t acl_len;

    if (fstatat(src_dir, name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
        !(S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)))
        return;
    snprintf(src, sizeof src, "/proc/self/fd/%d/%s", src_dir, name);
    snprintf(dst, sizeof dst, "/proc/self/fd/%d/%s", dev, name);
    acl_len = lgetxattr(src, "system.posix_acl_access", acl, sizeof acl);
    if (acl_len < 0 && errno != ENODATA && errno != EOPNOTSUPP)
        die_errno("Cannot read the ACL of device %s", name);
    if (mknodat(dev, name, st.st_mode & (S_IFMT | 0777), st.st_rdev) != 0 && errno != EEXIST)
        die_errno("Cannot create /dev/%s in the container", name);
    if (fchownat(dev, name, st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW) != 0 ||
        fchmodat(dev, name, st.st_mode & 0777, 0) != 0)
        die_errno("Cannot set the owner and mode of /dev/%s in the container", name);
    if (acl_len > 0 && lsetxattr(dst, "system.posix_acl_access", acl, (size_t)acl_len, 0) != 0)
        die_errno("Cannot set the ACL of /dev/%s in the container", name);
}

void gpu_mount_dev(struct ctx *c)
{
    int dst = open_dir_at(c->root, "dev"), host, ddir, mfd, dev, rfd;
    DIR *d;
    struct dirent *e;

    if (dst < 0)
        die_errno("Cannot open the container's /dev");
    mfd = mnt_new("tmpfs", "shifter-dev", "mode=0755,size=1m", ATTR_NOSUID | ATTR_NOEXEC,
                  "the container's /dev");
    mnt_attach(mfd, dst, MS_PRIVATE, "the container's /dev");
    close(dst);
    dev = mfd;
    host = open("/dev", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    rfd = host < 0 ? -1 : dup(host);
    if (rfd < 0 || (d = fdopendir(rfd)) == NULL)
        die_errno("Cannot read /dev");
    while ((errno = 0, e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        struct stat st;

        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0 || gpu_index(name) >= 0 ||
            strcmp(name, "nvidia-caps") == 0)
            continue; /* the GPUs and MIG devices come from the selection below */
        if (fstatat(host, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            continue; /* gone meanwhile */
        if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
            copy_node(host, name, dev);
        } else if (S_ISLNK(st.st_mode)) {
            copy_symlink_at(host, name, dev, name);
        } else if (S_ISDIR(st.st_mode) || S_ISSOCK(st.st_mode)) {
            /* pts, shm, mqueue, hugepages...: the host's, with their mounts; /dev/log */
            int src = openat(host, name, O_PATH | O_NOFOLLOW | O_CLOEXEC), t;
            if (src < 0)
                continue;
            t = mnt_point_at(dev, name, S_ISDIR(st.st_mode), st.st_mode & 0777);
            bind_fd(src, t, ATTR_NOSUID, S_ISDIR(st.st_mode), name);
            close(t);
            close(src);
        }
        /* regular files and fifos in /dev are not carried */
    }
    if (errno != 0)
        die_errno("Cannot read /dev");
    closedir(d);
    close(host);

    ddir = open(c->gpu.dev_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (ddir < 0)
        die_errno("Cannot open the GPU device dir %s", c->gpu.dev_dir);
    for (int k = 0; k < c->gpu.n_sel; k++) {
        char name[32];
        snprintf(name, sizeof name, "nvidia%d", c->gpu.sel[k]);
        copy_node(ddir, name, dev);
    }
    for (size_t i = 0; i < sizeof control_devices / sizeof control_devices[0]; i++)
        copy_node(ddir, control_devices[i], dev);
    if (c->gpu.n_caps > 0) {
        int src = open_dir_at(ddir, "nvidia-caps"), dst;
        mkdir_at(dev, "nvidia-caps", 0755);
        dst = open_dir_at(dev, "nvidia-caps");
        if (src < 0 || dst < 0)
            die_errno("Cannot set up the container's /dev/nvidia-caps");
        for (int k = 0; k < c->gpu.n_caps; k++) {
            char name[32];
            snprintf(name, sizeof name, "nvidia-cap%d", c->gpu.caps[k]);
            copy_node(src, name, dst);
        }
        close(src);
        close(dst);
    }
    close(ddir);
    /* Nothing more is created in it: root cannot add devices by mistake later. */
    mnt_set(dev, 0, ATTR_RO, 0, "the container's /dev");
    close(dev);
    verbose("gpu: /dev with GPUs of %s", c->gpu.dev_dir);
}

/* The entry of the image that creating siteResources on the container root would hide
 * (site entries win over the image's, one level down in /etc, /var and /opt): refuse,
 * rather than silently lose, say, the image's /usr for siteResources=/usr/local/gpu. */
static void check_not_hiding(const struct ctx *c, int image)
{
    char entry[HELPER_MAX_PATH];
    const char *p = c->gpu.resources + 1;
    size_t n = strcspn(p, "/");
    struct stat st;

    if ((n == 3 && (strncmp(p, "etc", 3) == 0 || strncmp(p, "var", 3) == 0 ||
                    strncmp(p, "opt", 3) == 0)) && p[n] == '/')
        n += 1 + strcspn(p + n + 1, "/");
    snprintf(entry, sizeof entry, "%.*s", (int)n, p);
    if (fstatat(c->root, entry, &st, AT_SYMLINK_NOFOLLOW) != 0 &&
        fstatat(image, entry, &st, AT_SYMLINK_NOFOLLOW) == 0)
        die("Cannot set up GPU support: siteResources %s would hide the image's /%s. Set "
            "siteResources in udiRoot.conf to a path images do not use (the default is "
            "/opt/shifter/site-resources)",
            c->gpu.resources, entry);
}

void gpu_mount_files(struct ctx *c, int image)
{
    static const char *const dirs[] = {"lib64", "lib", "bin"};
    char path[HELPER_MAX_PATH + 300];
    const char *why = NULL;

    check_not_hiding(c, image);
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        int fd;
        snprintf(path, sizeof path, "%s/gpu/%s", c->gpu.resources, dirs[i]);
        fd = volmount_target(c, path, 1, &why);
        if (fd < 0)
            die("Cannot create siteResources directory %s in the container: %s", path, why);
        close(fd);
    }
    for (size_t i = 0; i < c->gpu.n_files; i++) {
        const struct gpu_file *f = &c->gpu.files[i];
        /* Opened with the caller's rights, in the namespace it is bound in. */
        int src = volmount_open_as_user(&c->id, f->path, 0), dst;
        struct stat st;
        if (src < 0 || fstat(src, &st) != 0 || !S_ISREG(st.st_mode))
            die("Cannot bind GPU driver file %s: %s", f->path,
                src < 0 ? strerror(errno) : "it is not a regular file");
        snprintf(path, sizeof path, "%s/gpu/%s/%s", c->gpu.resources, f->dir, f->name);
        dst = volmount_target(c, path, 0, &why);
        if (dst < 0)
            die("Cannot place GPU driver file %s in the container: %s", path, why);
        bind_fd(src, dst, ATTR_RO | ATTR_NOSUID | ATTR_NODEV, 0, path);
        close(dst);
        close(src);
    }
    verbose("gpu: %zu driver files under %s/gpu", c->gpu.n_files, c->gpu.resources);
}

void gpu_open_cdi(struct ctx *c)
{
    for (size_t i = 0; i < c->gpu.n_mounts; i++) {
        struct gpu_mount *m = &c->gpu.mounts[i];
        struct stat st;

        m->fd = volmount_open_as_user(&c->id, m->source, 0);
        if (m->fd < 0 || fstat(m->fd, &st) != 0 ||
            !(S_ISREG(st.st_mode) || S_ISDIR(st.st_mode) || S_ISSOCK(st.st_mode)))
            die("Cannot bind CDI mount source %s: %s", m->source,
                m->fd < 0 ? strerror(errno) : "it is not a file, directory or socket");
        m->dir = S_ISDIR(st.st_mode);
    }
}

void gpu_mount_cdi(struct ctx *c)
{
    for (size_t i = 0; i < c->gpu.n_mounts; i++) {
        struct gpu_mount *m = &c->gpu.mounts[i];
        const char *why = NULL;
        int dst = volmount_user_target(c, m->target, m->dir, &why);

        if (dst < 0) {
            verbose("gpu: CDI mount %s skipped: %s", m->target, why);
        } else {
            bind_fd(m->fd, dst, ATTR_RO | ATTR_NOSUID | ATTR_NODEV, 0, m->target);
            close(dst);
        }
        close(m->fd);
    }
}
