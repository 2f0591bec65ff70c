/*
 * container.c - build the container in the order of docs/behaviour.md, 'Runtime: building the container':
 *
 *   1 (run) unshare(CLONE_NEWNS), / recursively slave
 *   2 unmount anything under udiMount and loopMount
 *   3 image loop-mounted ro,nosuid,nodev at loopMount (or --local bound there)
 *   4 rootfsType at udiMount, nosuid,nodev, 0755
 *   5 site: dirs, pre-mount hook, siteFs, post-mount hook, module siteFs, /etc,
 *     /opt/udiImage, (shifter-setup) hostsfile, module roothooks, the front end's
 *     passwd/group (--etc-fd), proc sys dev tmp var/tmp
 *   6 image content: top level of /, then /var, /opt and /etc, site entries win; from an
 *     overlay over the image with --writable-tmpfs or a volume inside an image directory
 *   7 user volumes, (run) the step's PMIx directory; then shifter-setup's sshd
 *   8 (shifter-setup) var/shifterConfig.json; root read-only unless mountUdiRootWritable=1
 *
 * The container root is handled as a directory fd (the rootfs mount fd) from
 * step 4 on; every entry is created relative to it without following links.
 */
#define _GNU_SOURCE
#include "container.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "copy.h"
#include "etcfiles.h"
#include "loop.h"
#include "mnt.h"
#include "pmix.h"
#include "util.h"
#include "volmount.h"
#include "writable.h"

#define BIND_FILE_OVER (1024 * 1024) /* image files larger than this are bound, not copied */

/* ---- signature ---------------------------------------------------------------- */

/* s as the inside of a JSON string. */
static void json_add(FILE *f, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
}

char *container_signature(const struct ctx *c)
{
    char *vols = vol_signature(&c->vols), *out = NULL;
    size_t len;
    FILE *f = open_memstream(&out, &len);

    if (vols == NULL || f == NULL)
        die("shifter-helper: out of memory");
    fputs("{\"identifier\":\"", f);
    json_add(f, c->image_id ? c->image_id : c->local_path);
    fputs("\",\"user\":\"", f);
    json_add(f, c->id.name);
    fputs("\",\"volMap\":\"", f);
    json_add(f, vols);
    fputs("\",\"modules\":\"", f);
    for (size_t i = 0; i < c->n_modules; i++) {
        json_add(f, c->modules[i]);
        fputc(',', f);
    }
    if (c->gpu.requested) {
        /* Only with --gpu, so that every other signature stays Shifter's byte for byte. */
        char gpus[GPU_MAX * 4];
        gpu_signature(&c->gpu, gpus, sizeof gpus);
        fprintf(f, "\",\"gpus\":\"%s", gpus);
    }
    if (c->writable_size != 0) /* never the shared, read-only prepared container */
        fprintf(f, "\",\"writable\":\"%llu", (unsigned long long)c->writable_size);
    fputs("\"}", f);
    if (fclose(f) != 0)
        die("shifter-helper: out of memory");
    free(vols);
    return out;
}

int container_prepared(const struct ctx *c, const char *signature)
{
    int root = open(c->udi, O_PATH | O_DIRECTORY | O_CLOEXEC), var;
    char *text;
    size_t len;
    int match;

    if (root < 0)
        return -1;
    var = open_dir_at(root, "var");
    if (var < 0 || read_small_file_at(var, "shifterConfig.json", 1, &text, &len) != 0) {
        if (var >= 0)
            close(var);
        close(root);
        return -1;
    }
    close(var);
    match = len == strlen(signature) && memcmp(text, signature, len) == 0;
    free(text);
    if (!match) {
        close(root);
        return -1;
    }
    verbose("entering the prepared container at %s", c->udi);
    return root;
}

/* ---- steps 3 and 4 ------------------------------------------------------------- */

static int open_config_dir(const char *path, const char *key)
{
    int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        die_errno("Cannot open %s %s", key, path);
    return fd;
}

static int mount_image(struct ctx *c)
{
    int dst = open_config_dir(c->loop, "loopMount"), mfd;

    if (c->local_path != NULL) {
        int src = volmount_open_as_user(&c->id, c->local_path, 1);
        if (src < 0)
            die_user("FAILED to use %s as the image root: %s", c->local_path, strerror(errno));
        /* With what is mounted below it (not the files those mounts hide), read-only,
         * nosuid, nodev all the way down; made private below once attached. */
        mfd = mnt_clone(src, 1, ATTR_RO | ATTR_NOSUID | ATTR_NODEV, c->local_path);
        close(src);
    } else {
        const char *dir = conf_get(c->conf, "imagePath");
        const char *fmt = c->meta.format;
        char name[256], dev[64];
        int idir = open_config_dir(dir, "imagePath"), file, lfd;
        struct stat st;

        if (strcmp(fmt, "squashfs") != 0 && strcmp(fmt, "xfs") != 0)
            die_user("FAILED: image format '%s' is not supported (squashfs or xfs)", fmt);
        snprintf(name, sizeof name, "%s.%s", c->image_id, fmt);
        file = openat(idir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (file < 0)
            die_user("FAILED to find requested image. (%s/%s: %s)", dir, name, strerror(errno));
        if (fstat(file, &st) != 0 || !S_ISREG(st.st_mode))
            die_user("FAILED to find requested image. (%s/%s is not a regular file)", dir, name);
        close(idir);
        lfd = loop_attach(file, 1, name, dev, sizeof dev);
        close(file);
        mfd = mnt_new(fmt, dev, strcmp(fmt, "xfs") == 0 ? "ro,norecovery" : "ro",
                      ATTR_RO | ATTR_NOSUID | ATTR_NODEV, name);
        close(lfd); /* the mount holds the device now; autoclear frees it with the mount */
    }
    mnt_attach(mfd, dst, 0, "the image");
    mnt_set(mfd, 1, 0, MS_PRIVATE, "the image");
    close(dst);
    verbose("image mounted at %s", c->loop);
    return mfd;
}

static void mount_rootfs(struct ctx *c)
{
    const char *type = conf_get(c->conf, "rootfsType");
    int dst = open_config_dir(c->udi, "udiMount");

    if (strcmp(type, "tmpfs") != 0 && strcmp(type, "ramfs") != 0)
        die("FAILED to parse udiRoot configuration. (rootfsType must be tmpfs or ramfs)");
    c->root = mnt_new(type, "shifter", "mode=0755", ATTR_NOSUID | ATTR_NODEV, "the container root");
    mnt_attach(c->root, dst, MS_PRIVATE, "the container root");
    if (fchownat(c->root, "", 0, 0, AT_EMPTY_PATH) != 0)
        die_errno("Cannot chown the container root");
    close(dst);
}

/* ---- step 5 --------------------------------------------------------------------- */

static void make_dirs(int root)
{
    static const char *const dirs[] = {
        "etc", "etc/udiImage", "opt", "opt/udiImage", "opt/udiImage/modules", "var",
        "var/spool", "var/run", "var/tmp", "var/empty", "proc", "sys", "dev", "tmp",
    };
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++)
        mkdir_at(root, dirs[i], strcmp(dirs[i], "var/empty") == 0 ? 0700 : 0755);
}

/* Module i's copyPath opened (-1 when it has none).  container_build calls this for every
 * module before anything is mounted, so a site typo names the module and the path and no
 * hook has run yet; opt_udi_image opens it again to copy it. */
static int open_copy_path(const struct ctx *c, size_t i)
{
    const char *path = module_get(c->conf, c->modules[i], "copyPath");
    int fd;

    if (path == NULL || *path == '\0')
        return -1;
    if (path[0] != '/')
        die("Failed to setup module %s: its copyPath %s is not an absolute path",
            c->modules[i], path);
    fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        die_errno("Failed to setup module %s: cannot open its copyPath %s", c->modules[i], path);
    return fd;
}

static void opt_udi_image(struct ctx *c)
{
    const char *opt = conf_get(c->conf, "optUdiImage");
    int dst = open_dir_at(c->root, "opt/udiImage");

    if (dst < 0)
        die_errno("Cannot open opt/udiImage");
    if (opt != NULL && *opt != '\0') {
        int src = open_config_dir(opt, "optUdiImage");
        copy_tree(src, dst, opt, 1);
        close(src);
    }
    for (size_t i = 0; i < c->n_modules; i++) {
        const char *path = module_get(c->conf, c->modules[i], "copyPath");
        int mods, mdst, src = open_copy_path(c, i);
        if (src < 0)
            continue;
        mods = open_dir_at(dst, "modules");
        if (mods < 0)
            die_errno("Cannot open opt/udiImage/modules");
        mkdir_at(mods, c->modules[i], 0755);
        mdst = open_dir_at(mods, c->modules[i]);
        if (mdst < 0)
            die_errno("Cannot open opt/udiImage/modules/%s", c->modules[i]);
        copy_tree(src, mdst, path, 1);
        close(src);
        close(mdst);
        close(mods);
    }
    close(dst);
}

static void bind_host_dir(struct ctx *c, const char *host, const char *name, int rec,
                          unsigned attrs)
{
    int src = open(host, O_PATH | O_DIRECTORY | O_CLOEXEC);
    int dst = open_dir_at(c->root, name), mfd;

    if (src < 0)
        die_errno("Cannot open %s", host);
    if (dst < 0)
        die_errno("Cannot open the container's %s", name);
    mfd = mnt_clone(src, rec, attrs, host);
    mnt_attach(mfd, dst, 0, host);
    mnt_set(mfd, rec, 0, MS_PRIVATE, host);
    close(mfd);
    close(src);
    close(dst);
}

static void system_mounts(struct ctx *c)
{
    /* The host's /proc itself (the node shares its pid namespace): a fresh procfs
     * without the host's hidepid/gid/subset would show users every process and command
     * line of the node; recursive, so what the host mounted over /proc entries stays. */
    bind_host_dir(c, "/proc", "proc", 1, ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC);
    bind_host_dir(c, "/sys", "sys", 1, ATTR_NOSUID | ATTR_NODEV);
    if (c->gpu.requested)
        gpu_mount_dev(c); /* only the selected /dev/nvidiaN */
    else
        bind_host_dir(c, "/dev", "dev", 1, ATTR_NOSUID); /* devices allowed */
    bind_host_dir(c, "/tmp", "tmp", 0, ATTR_NOSUID | ATTR_NODEV);
    bind_host_dir(c, "/var/tmp", "var/tmp", 0, ATTR_NOSUID | ATTR_NODEV);
}

static void site_steps(struct ctx *c)
{
    const char *hook;

    make_dirs(c->root);
    hook = conf_get(c->conf, "sitePreMountHook");
    if (hook != NULL && *hook != '\0')
        run_root_hook(hook, c->udi, "sitePreMountHook");
    for (size_t i = 0; i < c->conf->n_site_fs; i++)
        volmount_site(c, c->conf->site_fs[i], "siteFs");
    hook = conf_get(c->conf, "sitePostMountHook");
    if (hook != NULL && *hook != '\0')
        run_root_hook(hook, c->udi, "sitePostMountHook");
    for (size_t i = 0; i < c->n_modules; i++) {
        const char *fs = module_get(c->conf, c->modules[i], "siteFs");
        if (fs != NULL && *fs != '\0')
            volmount_site(c, fs, c->modules[i]);
    }
    etc_populate(c->root, c->conf);
    verbose("etc populated");
    opt_udi_image(c);
    if (c->setup_step != NULL)
        c->setup_step(c, STEP_SITE_FILES);
    for (size_t i = 0; i < c->n_modules; i++) {
        const char *h = module_get(c->conf, c->modules[i], "roothook");
        if (h != NULL && *h != '\0') {
            char what[MAX_MODULE_NAME + 48];
            snprintf(what, sizeof what, "Failed to setup module %s: roothook", c->modules[i]);
            run_root_hook(h, c->udi, what);
        }
    }
    /* After the root hooks: root never runs anything on the front end's files. */
    etc_write_files(c->root, c->etc_files);
    system_mounts(c);
}

/* ---- step 6: image content -------------------------------------------------------- */

static int is_merged_dir(const char *name)
{
    return strcmp(name, "etc") == 0 || strcmp(name, "var") == 0 || strcmp(name, "opt") == 0;
}

/* Add the entries of image directory src to container directory dst; existing names win.
 * top: src is the image's /, where etc, var and opt are merged one level down; rw: bind
 * its directories and large files writable (the overlay of --writable-tmpfs). */
static void merge(int src, int dst, int top, int rw)
{
    int rfd = openat(src, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d;
    struct dirent *e;

    if (rfd < 0 || (d = fdopendir(rfd)) == NULL)
        die_errno("Cannot read the image");
    while ((errno = 0, e = readdir(d)) != NULL) {
        const char *name = e->d_name;
        struct stat st, have;

        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        if (fstatat(rfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
            die_errno("Cannot stat image entry %s", name);
        if (fstatat(dst, name, &have, AT_SYMLINK_NOFOLLOW) == 0) {
            if (top && is_merged_dir(name) && S_ISDIR(st.st_mode) && S_ISDIR(have.st_mode)) {
                int s = open_dir_at(rfd, name), t = open_dir_at(dst, name);
                if (s < 0 || t < 0)
                    die_errno("Cannot open /%s", name);
                merge(s, t, 0, rw);
                close(s);
                close(t);
            }
            continue; /* the site's entry wins */
        }
        if (errno != ENOENT)
            die_errno("Cannot stat %s in the container", name);
        if (S_ISDIR(st.st_mode))
            mnt_bind_at(rfd, name, dst, 1, rw);
        else if (S_ISLNK(st.st_mode))
            copy_symlink_at(rfd, name, dst, name);
        else if (S_ISREG(st.st_mode) && st.st_size > BIND_FILE_OVER)
            mnt_bind_at(rfd, name, dst, 0, rw);
        else if (S_ISREG(st.st_mode))
            copy_file_at(rfd, name, dst, name, 0, 1);
        /* devices, fifos, sockets: never from an image */
    }
    if (errno != 0)
        die_errno("Cannot read the image");
    closedir(d);
}

/* ---- the whole build ---------------------------------------------------------------- */

void container_build(struct ctx *c)
{
    int image;

    for (size_t i = 0; i < c->n_modules; i++) {
        int fd = open_copy_path(c, i);
        if (fd >= 0)
            close(fd);
    }
    volmount_check_caches(c);
    if (!c->setup_mode) {
        if (unshare(CLONE_NEWNS) != 0)
            die_errno("Cannot create a private mount namespace");
        if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
            die_errno("Cannot make / a slave mount");
    }
    if (c->setup_step != NULL) {
        c->setup_step(c, STEP_CLEAR); /* the caller's namespace: shifter-setup clears it */
    } else {
        const char *roots[2] = {c->udi, c->loop};
        mnt_detach_roots(roots, 2);
    }
    image = mount_image(c);
    mount_rootfs(c);
    site_steps(c);
    if (c->gpu.requested)
        gpu_mount_files(c, image);
    verbose("site steps done");
    gpu_open_cdi(c); /* as the user: a CDI mount's type decides its mount point's */
    image = writable_image(c, image); /* an overlay when writable or a mount point needs it */
    merge(image, c->root, 1, c->writable_size != 0);
    close(image);
    verbose("image content added");
    if (c->gpu.n_mounts > 0)
        gpu_mount_cdi(c); /* CDI mounts: image paths, before the user's volumes */
    volmount_user(c);
    if (c->pmix_dir != NULL)
        pmix_mount(c);
    if (c->setup_step != NULL)
        c->setup_step(c, STEP_USER_VOLUMES);
    if (!config_flag(conf_get(c->conf, "mountUdiRootWritable"), 0))
        mnt_set(c->root, 0, ATTR_RO, 0, "the container root");
    verbose("container ready at %s", c->udi);
}
