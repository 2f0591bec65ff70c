/*
 * enter.h - become the user inside the container and run the command.
 */
#ifndef SHIFTER_HELPERS_ENTER_H
#define SHIFTER_HELPERS_ENTER_H

#include "ctx.h"

/* chroot into root (closed), drop every privilege for good (verified); dies (status 1)
 * on any failure.  enter() and the per-container sshd (sshd.c) both start with this. */
void enter_user(const struct ctx *c, int root);

/* chroot into root, drop every privilege (verified), chdir workdir, run the modules'
 * userhooks, exec argv with envp.  Never returns: exits 1 on setup errors, 127 when the
 * command cannot be executed. */
__attribute__((noreturn)) void enter(const struct ctx *c, int root, const char *workdir,
                                     char *const argv[], char *const envp[]);

#endif
