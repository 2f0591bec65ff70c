/*
 * pmix.h - the Slurm step's PMIx server directory in the container (pmix.c;
 * docs/behaviour.md, 'Runtime: PMIx').
 */
#ifndef SHIFTER_HELPERS_PMIX_H
#define SHIFTER_HELPERS_PMIX_H

#include <stddef.h>

#include "ctx.h"

/* Check the text of --pmix-dir: an absolute path without "." or ".." components whose
 * last one is Slurm's pmix.<job>.<step>, not under /etc, /opt/udiImage, /proc, /sys or
 * /dev; trailing slashes dropped.  The canonical path goes to out; 0, or -1 with the
 * reason in err. */
int pmix_check_path(const char *path, char *out, size_t len, char *err, size_t errlen);

/* Validate --pmix-dir and open it with the user's identity (no symbolic link on the
 * way): a directory the user owns.  Sets c->pmix_dir and c->pmix_fd; dies with the
 * user's message otherwise, before anything is mounted. */
void pmix_open(struct ctx *c, const char *path);

/* Bind c->pmix_fd at c->pmix_dir in the container (c->root writable), nosuid, nodev,
 * noexec, not recursive, private; its mount point is made on the container's own
 * filesystem when missing.  Dies when the path leads elsewhere in the container. */
void pmix_mount(struct ctx *c);

/* The prepared container (root, from container_prepared) with the directory added in a
 * private mount namespace of this process: the node's container stays as it was, but
 * for an empty mount point.  Returns the root to enter. */
int pmix_enter_prepared(struct ctx *c, int root, const char *signature);

#endif
