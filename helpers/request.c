/*
 * request.c - what both programs do with a request before building: clear the
 * environment, load the trusted configuration, parse and re-validate every argument.
 * Linked into the setuid shifter-helper (run.c) and the root-only shifter-setup
 * (setup.c); PROTOCOL.md is the interface of both.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "request.h"

#include "util.h"

#ifndef CONF_PATH
#define CONF_PATH CONF_DEFAULT_PATH
#endif

#define MAX_ENV_BYTES (4 * 1024 * 1024)
#define MAX_ENV_RECORDS 65536
#define MAX_ARG 65536 /* bytes in one option value */

struct udiroot_conf conf;
struct ctx ctx;

int parse_fd(const char *option, const char *v)
{
    char *end;
    long fd;

    errno = 0;
    fd = strtol(v, &end, 10);
    if (errno != 0 || *end != '\0' || end == v || fd < 0 || fd > INT_MAX)
        die("shifter-helper: invalid %s %s", option, v);
    return (int)fd;
}

void parse_options(int argc, char **argv, int first, option_fn own, struct options *o)
{
    size_t vlen = 0;

    memset(o, 0, sizeof *o);
    o->env_fd = o->etc_fd = -1;
    for (int i = first; i < argc; i++) {
        const char *a = argv[i], *v;

        if (strcmp(a, "--") == 0) {
            o->argv = argv + i + 1;
            break;
        }
        if (strcmp(a, "--verbose") == 0) {
            g_verbose = 1;
            continue;
        }
        if (i + 1 >= argc)
            die("shifter-helper: option %s needs a value (or is unknown)", a);
        v = argv[++i];
        if (strlen(v) > MAX_ARG)
            die("shifter-helper: the value of %s is too long", a);
        if (strcmp(a, "--image-id") == 0 && ctx.image_id == NULL)
            ctx.image_id = v;
        else if (strcmp(a, "--local") == 0 && ctx.local_path == NULL)
            ctx.local_path = v;
        else if (strcmp(a, "--volume") == 0) {
            size_t n = strlen(v);
            char *nv = realloc(o->volumes, vlen + n + 2);
            if (nv == NULL)
                die("shifter-helper: out of memory");
            o->volumes = nv;
            if (vlen > 0)
                o->volumes[vlen++] = ';';
            memcpy(o->volumes + vlen, v, n + 1);
            vlen += n;
        } else if (strcmp(a, "--modules") == 0 && o->modules == NULL)
            o->modules = v;
        else if (strcmp(a, "--etc-fd") == 0 && o->etc_fd < 0)
            o->etc_fd = parse_fd(a, v);
        else if (!own(a, v, o))
            die("shifter-helper: unknown or repeated option %s", a);
    }
    if ((ctx.image_id == NULL) == (ctx.local_path == NULL))
        die("shifter-helper: exactly one of --image-id and --local is needed");
}

/* The module list (conf_select_modules says the rules); names stay valid for good. */
static void select_modules(const char *text)
{
    static struct conf_modules mods;
    static char err[CONF_ERR_LEN];

    if (conf_select_modules(&conf, text, &mods, err, sizeof err) != 0)
        die_user("%s", err); /* unknown, disabled, conflicting, too many: the user's list */
    for (size_t i = 0; i < mods.n; i++)
        ctx.modules[i] = mods.names[i];
    ctx.n_modules = mods.n;
}

char **read_records(int fd, const char *what)
{
    char *data = NULL, **recs;
    size_t len = 0, n = 0;
    struct stat st;

    if (fd >= 0) {
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || lseek(fd, 0, SEEK_SET) != 0 ||
            read_all_fd(fd, MAX_ENV_BYTES, &data, &len) != 0)
            die("shifter-helper: cannot read the %s: a regular file (memfd) of at most %d "
                "bytes is needed", what, MAX_ENV_BYTES);
        close(fd);
        if (len > 0 && data[len - 1] != '\0')
            die("shifter-helper: the %s's last record is not NUL-terminated", what);
        for (size_t off = 0; off < len; off += strlen(data + off) + 1)
            if (++n > MAX_ENV_RECORDS)
                die("shifter-helper: more than %d records in the %s", MAX_ENV_RECORDS, what);
    }
    recs = xcalloc(n + 1, sizeof *recs);
    n = 0;
    for (size_t off = 0; off < len; off += strlen(data + off) + 1) {
        if (data[off] == '=' || strchr(data + off, '=') == NULL)
            die("shifter-helper: invalid record '%.64s' in the %s", data + off, what);
        recs[n++] = data + off;
    }
    return recs;
}

void common_checks(struct options *o)
{
    char err[VOL_ERR_LEN];

    if (ctx.image_id != NULL && !meta_valid_image_id(ctx.image_id))
        die_user("FAILED to find requested image. (invalid image id)");
    if (ctx.local_path != NULL) {
        if (!config_flag(conf_get(&conf, "allowLocalChroot"), 0))
            die_user("Local chroot is not allowed on this system (allowLocalChroot=0)");
        if (!is_abs_clean_path(ctx.local_path))
            die_user("Invalid local path %s: must be absolute, without '..'", ctx.local_path);
    }
    if (o->volumes != NULL && vol_parse_map(o->volumes, 0, &ctx.vols, err, sizeof err) != 0)
        die_user("%s", err);
    /* The front end resolves defaultModules; the list given is final (absent = none). */
    if (o->modules != NULL)
        select_modules(o->modules);
    if (o->gpu != NULL && gpu_parse(o->gpu, &ctx.gpu, err, sizeof err) != 0)
        die_user("%s", err);
    if (o->gpu == NULL && (ctx.gpu.n_files > 0 || ctx.gpu.n_caps > 0 || ctx.gpu.n_mounts > 0))
        die("shifter-helper: --gpu-file, --gpu-cap and --gpu-mount need --gpu");
    if (ctx.image_id != NULL) {
        const char *dir = conf_get(&conf, "imagePath");
        int fd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            die_errno("Cannot open imagePath %s", dir);
        meta_read(fd, ctx.image_id, &ctx.meta);
        close(fd);
        if (ctx.meta.format[0] == '\0')
            snprintf(ctx.meta.format, sizeof ctx.meta.format, "squashfs");
        if (!meta_allows(&ctx.meta, &ctx.id))
            die_user("FAILED permission denied to image");
    }
    if (ctx.gpu.requested)
        gpu_discover(&conf, &ctx.gpu); /* before anything is mounted */
}

static void canonical(const char *key, char *out, size_t len)
{
    const char *v = conf_get(&conf, key);
    char *r;

    if (v == NULL || v[0] != '/')
        die("FAILED to parse udiRoot configuration. (%s must be an absolute path)", key);
    r = realpath(v, NULL);
    if (r == NULL)
        die_errno("Cannot find %s %s", key, v);
    if (strcmp(r, "/") == 0 || strlen(r) >= len)
        die("FAILED to parse udiRoot configuration. (%s cannot be %s)", key, r);
    snprintf(out, len, "%s", r);
    free(r);
}

void helper_init(int argc)
{
    static char err[CONF_ERR_LEN];

    /* Nothing of the caller's environment is used, and its umask and signal
     * dispositions must not shape what root creates or how it waits. */
    if (clearenv() != 0)
        _exit(1);
    umask(022);
    signal(SIGCHLD, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    if (chdir("/") != 0)
        die_errno("shifter-helper: chdir /");
    if (geteuid() != 0)
        die("shifter-helper must be installed setuid root (make install)");
    if (argc < 2)
        usage();
    if (conf_load(CONF_PATH, &conf, err, sizeof err) != 0)
        die("FAILED to parse udiRoot configuration. (%s)", err);
    for (size_t i = 0; i < conf.n_warnings; i++)
        warn("%s", conf.warnings[i]);
    /* Shifter's tool paths (conf_tool_keys) are not checked: nothing here runs them. */
    canonical("udiMount", ctx.udi, sizeof ctx.udi);
    canonical("loopMount", ctx.loop, sizeof ctx.loop);
    ctx.conf = &conf;
    ctx.root = -1;
    ctx.sshd_pidfd = -1;
    {
        const char *style = conf_get(&conf, "mountPropagationStyle");
        ctx.propagation = style != NULL && strcmp(style, "private") == 0 ? MS_PRIVATE : MS_SLAVE;
    }
}
