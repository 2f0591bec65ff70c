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
    const char *workdir, *request, *modules, *gpu; /* run's own: workdir, request, gpu */
    const char *pmix_dir; /* run's own: --pmix-dir, checked by pmix_open */
    const char *writable; /* run's own: --writable-tmpfs SIZE, checked by writable_check */
    int env_fd, etc_fd; /* --env-fd (run), --etc-fd, -1 when absent */
    char *volumes;      /* concatenated --volume lists */
    char **argv;        /* after "--" (run), else NULL */
};

/* A program's own options (run.c, setup.c): 1 when a, with its value v, is one of them
 * and was taken, 0 when it is unknown or repeated. */
typedef int (*option_fn)(const char *a, const char *v, struct options *o);

/* Each program's usage message (run.c, setup.c); exits 1. */
__attribute__((noreturn)) void usage(void);

/* Clear the environment, umask and signals; load and check the configuration; fill the
 * configured paths of ctx.  Dies on any failure. */
void helper_init(int argc);

/* Options from argv[first]: those of both programs (--image-id, --local, --volume,
 * --modules, --etc-fd, --verbose, "--" ending them), the rest through own. */
void parse_options(int argc, char **argv, int first, option_fn own, struct options *o);

/* The value of a --...-fd option; dies unless a decimal fd number. */
int parse_fd(const char *option, const char *v);

/* Validate image, --local, volumes, modules, GPUs; read the image's .meta and check its
 * ACL for ctx.id; find the GPU files.  Dies with the user's message on any failure. */
void common_checks(struct options *o);

/* NUL-terminated NAME=VALUE records from a memfd (--env-fd: the command's environment,
 * --etc-fd: the front end's /etc files), read from offset 0; what names it in messages.
 * fd -1: none.  Returns a NULL-terminated list. */
char **read_records(int fd, const char *what);

#endif
