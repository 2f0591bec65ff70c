/*
 * shifter-setup - the root-only part of Shifter in Python (never setuid).
 *
 *   shifter-setup setup [options]     prepare the node's container for a job
 *   shifter-setup unsetup             remove it
 *
 * setupRoot and unsetupRoot (the Slurm prolog and epilog) run it as root.  It shares
 * the request checks (request.c) and the build (container.c) with the setuid
 * shifter-helper and adds what only root may ask for: the container in the caller's
 * mount namespace, the hostsfile, the per-container sshd (sshd.c) and the teardown.
 */
#define _GNU_SOURCE
#include <string.h>
#include <unistd.h>

#include "container.h"
#include "etcfiles.h"
#include "request.h"
#include "sshd.h"
#include "util.h"

void usage(void)
{
    die("usage: shifter-setup setup --user NAME --uid U --gid G (--image-id ID | --local "
        "PATH) [--volume LIST]... [--modules LIST] [--nodes LIST] [--ssh-pubkey KEY] "
        "[--verbose]\n"
        "       shifter-setup unsetup [--verbose]");
}

/* shifter-setup's own steps of the build (container.c calls them). */
static void setup_step(struct ctx *c, enum build_step step)
{
    if (step == STEP_CLEAR)
        sshd_stop(c); /* a previous job's, left by a missed unsetup */
    else if (step == STEP_SITE_FILES && c->nodes != NULL)
        hosts_write(c->root, c->nodes);
    else if (step == STEP_USER_VOLUMES && c->ssh_key != NULL)
        sshd_start(c, c->ssh_key);
}

static void teardown(void)
{
    sshd_stop(&ctx);
    container_teardown(&ctx);
}

int main(int argc, char **argv)
{
    char err[VOL_ERR_LEN];
    struct options o;
    char *sig;

    if (getuid() != 0)
        die("shifter-setup is for root only (setupRoot, unsetupRoot)");
    helper_init(argc);
    if (strcmp(argv[1], "unsetup") == 0) {
        if (argc == 3 && strcmp(argv[2], "--verbose") == 0)
            g_verbose = 1;
        else if (argc != 2)
            usage();
        sshd_stop(&ctx); /* first: it runs inside what is unmounted next */
        return container_teardown(&ctx) == 0 ? 0 : 1;
    }
    if (strcmp(argv[1], "setup") != 0)
        usage();
    parse_options(argc, argv, 2, 0, &o);
    ident_from_args(&conf, o.user, o.uid, o.gid, &ctx.id);
    ctx.setup_mode = 1;
    ctx.setup_step = setup_step;
    common_checks(&o);
    if (ctx.nodes != NULL && hosts_validate(ctx.nodes, err, sizeof err) != 0)
        die("%s", err);
    if (o.ssh_key != NULL && sshd_check_key(o.ssh_key, err, sizeof err) != 0)
        die("%s", err);
    ctx.ssh_key = o.ssh_key;
    sig = container_signature(&ctx);
    g_cleanup = teardown; /* from here on a failure unmounts what was built */
    container_build(&ctx, sig);
    g_cleanup = NULL;
    verbose("setup done");
    return 0;
}
