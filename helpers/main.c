/*
 * shifter-helper - the setuid-root part of Shifter in Python.
 *
 *   shifter-helper run [options] -- CMD [ARG...]   any user but root
 *   shifter-helper setup [options]                 root only
 *   shifter-helper unsetup                         root only
 *
 * PROTOCOL.md is the interface.  This file: clear the environment, load the
 * trusted configuration, parse and re-validate every argument, then hand over
 * to container.c (build) and enter.c (drop privileges, exec).
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

#include "conf.h"
#include "container.h"
#include "enter.h"
#include "etcfiles.h"
#include "ident.h"
#include "meta.h"
#include "sshd.h"
#include "util.h"
#include "volume.h"

#ifndef CONF_PATH
#define CONF_PATH CONF_DEFAULT_PATH
#endif

#define MAX_ENV_BYTES (4 * 1024 * 1024)
#define MAX_ENV_RECORDS 65536
#define MAX_ARG 65536 /* bytes in one option value */
#define MAX_HOST_KEY 16384 /* bytes of the job's ssh host key file */

static struct udiroot_conf conf;
static struct ctx ctx;

struct options {
    const char *workdir, *request, *modules, *user, *uid, *gid, *ssh_key, *gpu;
    int env_fd, host_key_fd;
    const char *host_pub;
    char *volumes; /* concatenated --volume lists */
    char **argv;   /* after "--" */
};

static void usage(void)
{
    die("usage: shifter-helper run [--image-id ID | --local PATH] [--volume LIST]... "
        "[--modules LIST] [--gpu all|N,N] [--workdir DIR] [--env-fd N] [--request TEXT] [--verbose] -- CMD "
        "[ARG...]\n"
        "       shifter-helper setup --user NAME --uid U --gid G (--image-id ID | --local "
        "PATH) [--volume LIST]... [--modules LIST] [--nodes LIST] [--ssh-pubkey KEY\n"
        "       [--ssh-hostkey-fd N --ssh-host-pubkey KEY]]\n"
        "       shifter-helper unsetup");
}

static void parse_options(int argc, char **argv, int first, int is_run, struct options *o)
{
    size_t vlen = 0;

    memset(o, 0, sizeof *o);
    o->env_fd = -1;
    o->host_key_fd = -1;
    for (int i = first; i < argc; i++) {
        const char *a = argv[i], *v;

        if (strcmp(a, "--") == 0 && is_run) {
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
        else if (strcmp(a, "--workdir") == 0 && is_run && o->workdir == NULL)
            o->workdir = v;
        else if (strcmp(a, "--gpu") == 0 && is_run && o->gpu == NULL)
            o->gpu = v;
        else if (strcmp(a, "--request") == 0 && is_run && o->request == NULL)
            o->request = v;
        else if (strcmp(a, "--env-fd") == 0 && is_run && o->env_fd < 0) {
            char *end;
            long fd;
            errno = 0;
            fd = strtol(v, &end, 10);
            if (errno != 0 || *end != '\0' || end == v || fd < 0 || fd > INT_MAX)
                die("shifter-helper: invalid --env-fd %s", v);
            o->env_fd = (int)fd;
        } else if (strcmp(a, "--ssh-hostkey-fd") == 0 && !is_run && o->host_key_fd < 0) {
            char *end;
            long fd;
            errno = 0;
            fd = strtol(v, &end, 10);
            if (errno != 0 || *end != '\0' || end == v || fd < 0 || fd > INT_MAX)
                die("shifter-helper: invalid --ssh-hostkey-fd %s", v);
            o->host_key_fd = (int)fd;
        } else if (strcmp(a, "--ssh-host-pubkey") == 0 && !is_run && o->host_pub == NULL)
            o->host_pub = v;
        else if (strcmp(a, "--user") == 0 && !is_run && o->user == NULL)
            o->user = v;
        else if (strcmp(a, "--uid") == 0 && !is_run && o->uid == NULL)
            o->uid = v;
        else if (strcmp(a, "--gid") == 0 && !is_run && o->gid == NULL)
            o->gid = v;
        else if (strcmp(a, "--nodes") == 0 && !is_run && ctx.nodes == NULL)
            ctx.nodes = v;
        else if (strcmp(a, "--ssh-pubkey") == 0 && !is_run && o->ssh_key == NULL)
            o->ssh_key = v;
        else
            die("shifter-helper: unknown or repeated option %s", a);
    }
    if ((ctx.image_id == NULL) == (ctx.local_path == NULL))
        die("shifter-helper: exactly one of --image-id and --local is needed");
    if (is_run && (o->argv == NULL || o->argv[0] == NULL || o->argv[0][0] == '\0'))
        die("shifter-helper: no command given (run ... -- CMD [ARG...])");
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

/* The job's ssh host key from --ssh-hostkey-fd: a memfd holding the private key file
 * (never an argument: argv is anybody's to read in /proc). */
static char *read_host_key(int fd)
{
    char *data = xmalloc(MAX_HOST_KEY + 1);
    size_t len = 0;
    struct stat st;

    if (fstat(fd, &st) != 0)
        die_errno("shifter-helper: --ssh-hostkey-fd %d", fd);
    if (!S_ISREG(st.st_mode) || st.st_size > MAX_HOST_KEY)
        die("shifter-helper: --ssh-hostkey-fd must be a regular file (memfd) of at most %d "
            "bytes", MAX_HOST_KEY);
    for (;;) {
        ssize_t r = pread(fd, data + len, MAX_HOST_KEY - len, (off_t)len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die_errno("shifter-helper: cannot read --ssh-hostkey-fd");
        if (r == 0)
            break;
        len += (size_t)r;
        if (len == MAX_HOST_KEY)
            break; /* the check refuses it: longer than a key */
    }
    close(fd);
    data[len] = '\0';
    if (strlen(data) != len)
        die("shifter-helper: the job's ssh host key holds a NUL byte");
    return data;
}

/* The command's environment from --env-fd: NUL-terminated NAME=VALUE records. */
static char **read_env(int fd)
{
    char *data, **envp;
    size_t len = 0, n = 0, cap = 4096;
    struct stat st;

    envp = xcalloc(1, sizeof *envp);
    if (fd < 0)
        return envp;
    if (fstat(fd, &st) != 0)
        die_errno("shifter-helper: --env-fd %d", fd);
    if (!S_ISREG(st.st_mode) || st.st_size > MAX_ENV_BYTES)
        die("shifter-helper: --env-fd must be a regular file (memfd) of at most %d bytes",
            MAX_ENV_BYTES);
    data = xmalloc(MAX_ENV_BYTES + 1);
    for (;;) {
        ssize_t r = pread(fd, data + len, MAX_ENV_BYTES + 1 - len, (off_t)len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die_errno("shifter-helper: cannot read --env-fd");
        if (r == 0)
            break;
        len += (size_t)r;
        if (len > MAX_ENV_BYTES)
            die("shifter-helper: environment larger than %d bytes", MAX_ENV_BYTES);
    }
    close(fd);
    if (len > 0 && data[len - 1] != '\0')
        die("shifter-helper: the environment's last record is not NUL-terminated");
    free(envp);
    envp = xcalloc(cap + 1, sizeof *envp);
    for (size_t off = 0; off < len;) {
        char *rec = data + off;
        size_t rl = strlen(rec);
        char *eq = strchr(rec, '=');
        if (eq == NULL || eq == rec)
            die("shifter-helper: invalid environment record '%.64s'", rec);
        if (n >= MAX_ENV_RECORDS)
            die("shifter-helper: more than %d environment variables", MAX_ENV_RECORDS);
        if (n == cap) {
            char **ne = realloc(envp, (cap * 2 + 1) * sizeof *envp);
            if (ne == NULL)
                die("shifter-helper: out of memory");
            envp = ne;
            cap *= 2;
        }
        envp[n++] = rec;
        envp[n] = NULL;
        off += rl + 1;
    }
    return envp;
}

static void common_checks(struct options *o)
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
    if (ctx.nodes != NULL && hosts_validate(ctx.nodes, err, sizeof err) != 0)
        die("%s", err);
    if (o->ssh_key != NULL && sshd_check_key(o->ssh_key, err, sizeof err) != 0)
        die_user("%s", err);
    ctx.ssh_key = o->ssh_key;
    if ((o->host_key_fd >= 0) != (o->host_pub != NULL) ||
        (o->host_pub != NULL && o->ssh_key == NULL))
        die("shifter-helper: --ssh-hostkey-fd and --ssh-host-pubkey go together, with "
            "--ssh-pubkey");
    if (o->host_pub != NULL) { /* the key was read from the fd by main() */
        if (sshd_check_host_key(ctx.ssh_host_key ? ctx.ssh_host_key : "", o->host_pub, err,
                                sizeof err) != 0)
            die_user("%s", err); /* it comes from the user's submission */
        ctx.ssh_host_pub = o->host_pub;
    }
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

static void teardown(void)
{
    sshd_stop(&ctx);
    container_teardown(&ctx);
}

int main(int argc, char **argv)
{
    static char err[CONF_ERR_LEN];
    struct options o;
    const char *mode;
    uid_t ruid = getuid();
    char *sig;
    int root;

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
    mode = argv[1];

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

    if (strcmp(mode, "unsetup") == 0) {
        if (ruid != 0)
            die("unsetup is for root only");
        if (argc == 3 && strcmp(argv[2], "--verbose") == 0)
            g_verbose = 1;
        else if (argc != 2)
            usage();
        sshd_stop(&ctx); /* first: it runs inside what is unmounted next */
        return container_teardown(&ctx) == 0 ? 0 : 1;
    }
    if (strcmp(mode, "setup") == 0) {
        if (ruid != 0)
            die("setup is for root only");
        parse_options(argc, argv, 2, 0, &o);
        ident_from_args(&conf, o.user, o.uid, o.gid, &ctx.id);
        ctx.setup_mode = 1;
        g_user_error_status = 2; /* the prolog fails the job, not the node (PROTOCOL.md) */
        if (o.host_key_fd >= 0) /* here, not in common_checks: the fuzzer reads no fd */
            ctx.ssh_host_key = read_host_key(o.host_key_fd);
        common_checks(&o);
        sig = container_signature(&ctx);
        g_cleanup = teardown; /* from here on a failure unmounts what was built */
        container_build(&ctx, sig);
        g_cleanup = NULL;
        verbose("setup done");
        return 0;
    }
    if (strcmp(mode, "run") == 0) {
        char **envp;

        ident_from_caller(&conf, &ctx.id);
        /* Build as root:root; the real ids stay the caller's (they were read above). */
        if (setresgid((gid_t)-1, 0, (gid_t)-1) != 0)
            die_errno("shifter-helper: setresgid");
        parse_options(argc, argv, 2, 1, &o);
        /* The user's own path, resolved with the user's rights: ".." is harmless. */
        if (o.workdir != NULL && (o.workdir[0] != '/' || strlen(o.workdir) >= HELPER_MAX_PATH))
            die("shifter-helper: --workdir must be an absolute path");
        verbose("start");
        envp = read_env(o.env_fd);
        common_checks(&o);
        if (o.request != NULL)
            verbose("image request %.256s", o.request);
        sig = container_signature(&ctx);
        root = container_prepared(&ctx, sig);
        if (root < 0) {
            container_build(&ctx, sig);
            root = ctx.root;
        }
        free(sig);
        enter(&ctx, root, o.workdir, o.argv, envp);
    }
    usage();
}
