/*
 * shifter-helper - the setuid-root part of Shifter in Python.
 *
 *   shifter-helper run [options] -- CMD [ARG...]   any user but root
 *
 * It holds only what an unprivileged caller can reach; the root-only modes (setup,
 * unsetup, the per-container sshd, the hostsfile) are shifter-setup's (setup.c), which
 * is never setuid.  PROTOCOL.md is the interface.  This file: the run mode: the shared
 * checks (request.c), then reuse or build the container in a private mount namespace
 * (container.c) and become the user's command (enter.c).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "container.h"
#include "enter.h"
#include "pmix.h"
#include "request.h"
#include "util.h"
#include "writable.h"

void usage(void)
{
    die("usage: shifter-helper run [--image-id ID | --local PATH] [--volume LIST]... "
        "[--modules LIST] [--gpu N,N] [--gpu-cap N,N] [--gpu-file DIR/NAME=PATH]... "
        "[--gpu-mount TARGET=PATH]... [--workdir DIR] "
        "[--env-fd N] [--etc-fd N] [--pmix-dir DIR] [--writable-tmpfs SIZE] [--request TEXT] "
        "[--verbose] "
        "-- CMD [ARG...]");
}

/* run's own options; setup's are not known here at all. */
static int run_option(const char *a, const char *v, struct options *o)
{
    char err[512];

    if (strcmp(a, "--gpu-file") == 0) {
        if (gpu_add_file(v, &ctx.gpu, err, sizeof err) != 0)
            die("%s", err);
    } else if (strcmp(a, "--gpu-mount") == 0) {
        if (gpu_add_mount(v, &ctx.gpu, err, sizeof err) != 0)
            die_user("%s", err);
    } else if (strcmp(a, "--gpu-cap") == 0 && ctx.gpu.n_caps == 0) {
        if (gpu_parse_caps(v, &ctx.gpu, err, sizeof err) != 0)
            die_user("%s", err);
    } else if (strcmp(a, "--workdir") == 0 && o->workdir == NULL)
        o->workdir = v;
    else if (strcmp(a, "--gpu") == 0 && o->gpu == NULL)
        o->gpu = v;
    else if (strcmp(a, "--request") == 0 && o->request == NULL)
        o->request = v;
    else if (strcmp(a, "--env-fd") == 0 && o->env_fd < 0)
        o->env_fd = parse_fd(a, v);
    else if (strcmp(a, "--pmix-dir") == 0 && o->pmix_dir == NULL)
        o->pmix_dir = v;
    else if (strcmp(a, "--writable-tmpfs") == 0 && o->writable == NULL)
        o->writable = v;
    else
        return 0;
    return 1;
}

int main(int argc, char **argv)
{
    struct options o;
    char **envp, *sig;
    int root;

    helper_init(argc);
    if (strcmp(argv[1], "run") != 0)
        usage();
    ident_from_caller(&conf, &ctx.id);
    /* Build as root:root; the real ids stay the caller's (they were read above). */
    if (setresgid((gid_t)-1, 0, (gid_t)-1) != 0)
        die_errno("shifter-helper: setresgid");
    parse_options(argc, argv, 2, run_option, &o);
    if (o.argv == NULL || o.argv[0] == NULL || o.argv[0][0] == '\0')
        die("shifter-helper: no command given (run ... -- CMD [ARG...])");
    /* The user's own path, resolved with the user's rights: ".." is harmless. */
    if (o.workdir != NULL && (o.workdir[0] != '/' || strlen(o.workdir) >= HELPER_MAX_PATH))
        die("shifter-helper: --workdir must be an absolute path");
    verbose("start");
    envp = read_records(o.env_fd, "environment (--env-fd)");
    ctx.etc_files = read_records(o.etc_fd, "/etc files (--etc-fd)");
    common_checks(&o);
    if (o.pmix_dir != NULL)
        pmix_open(&ctx, o.pmix_dir);
    if (o.writable != NULL)
        writable_check(&ctx, o.writable);
    if (o.request != NULL)
        verbose("image request %.256s", o.request);
    sig = container_signature(&ctx);
    root = container_prepared(&ctx, sig);
    if (root < 0) {
        container_build(&ctx);
        root = ctx.root;
    } else if (ctx.pmix_dir != NULL) {
        root = pmix_enter_prepared(&ctx, root, sig);
    }
    free(sig);
    enter(&ctx, root, o.workdir, o.argv, envp);
}
