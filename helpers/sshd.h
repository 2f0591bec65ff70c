/*
 * sshd.h - the per-container sshd (docs/behaviour.md, 'Runtime: per-container sshd'): setup --ssh-pubkey KEY starts it as the
 * user inside the prepared container; unsetup (and a failing setup) stops it.
 */
#ifndef SHIFTER_HELPERS_SSHD_H
#define SHIFTER_HELPERS_SSHD_H

#include <stddef.h>

#include "ctx.h"

/* 0 when key is one OpenSSH public key "<type> <base64> [comment]" (a known type whose
 * base64 blob names that type), else -1 with a message in err. */
int sshd_check_key(const char *key, char *err, size_t len);

/* 0 when pem is an OpenSSH private key file as ssh-keygen writes it (the marker lines
 * around base64 lines, at most 16 KiB) and pub passes sshd_check_key; else -1 with a
 * message in err.  The job's host key: setup --ssh-hostkey-fd N --ssh-host-pubkey KEY. */
int sshd_check_host_key(const char *pem, const char *pub, char *err, size_t len);

/* Host key, configs and the user's shell in the container (still writable), then sshd
 * started as the user inside it, listening on port 1204; its pid is recorded in
 * var/run/shifter-sshd.  Sets c->sshd_pidfd.  Dies on any failure (the cleanup stops it). */
void sshd_start(struct ctx *c, const char *key);

/* Stop the sshd processes of the container at udiMount (or the one this setup started):
 * only processes whose root is the container root and whose executable is the
 * container's own sshd are killed.  Never dies. */
void sshd_stop(struct ctx *c);

#endif
