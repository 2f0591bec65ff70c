/*
 * request.h - the request checks both programs share (request.c): the setuid
 * shifter-helper (run.c, mode run) and the root-only shifter-setup (setup.c).
 */
#ifndef SHIFTER_HELPERS_REQUEST_H
#define SHIFTER_HELPERS_REQUEST_H

#include "conf.h"
#include "ctx.h"

/* The one configuration and the one container of this process. */
extern struct udiroot_conf conf;
extern struct ctx ctx;

struct options {
    const char *workdir, *request, *modules, *user, *uid, *gid, *ssh_key, *gpu;
    int env_fd, etc_fd; /* --env-fd, --etc-fd, -1 when absent */
    char *volumes; /* concatenated --volume lists */
    char **argv;   /* after "--" */
};

/* Each program's usage message (run.c, setup.c); exits 1. */
__attribute__((noreturn)) void usage(void);

/* Clear the environment, umask and signals; load and check the configuration; fill the
 * configured paths of ctx.  Dies on any failure. */
void helper_init(int argc);

/* Options from argv[first]; is_run: run's options (and "--" CMD), else setup's. */
void parse_options(int argc, char **argv, int first, int is_run, struct options *o);

/* Validate image, --local, volumes, modules, GPUs; read the image's .meta and check its
 * ACL for ctx.id; find the GPU files.  Dies with the user's message on any failure. */
void common_checks(struct options *o);

/* NUL-terminated NAME=VALUE records from a memfd (--env-fd: the command's environment,
 * --etc-fd: the front end's /etc files), read from offset 0; what names it in messages.
 * fd -1: none.  Returns a NULL-terminated list. */
char **read_records(int fd, const char *what);

#endif
