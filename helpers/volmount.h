/*
 * volmount.h - mounting volumes into the container: siteFs (site rules, root's
 * paths) and the user's --volume list (user's identity, perNodeCache).
 */
#ifndef SHIFTER_HELPERS_VOLMOUNT_H
#define SHIFTER_HELPERS_VOLMOUNT_H

#include "ctx.h"

/* Mount a siteFs list (global or a module's); what names it in messages. */
void volmount_site(struct ctx *c, const char *text, const char *what);

/* Refuse (die, before anything is built) perNodeCaches of c->vols whose sizes add up to
 * more than perNodeCacheTotalSizeLimit (unset: perNodeCacheSizeLimit). */
void volmount_check_caches(const struct ctx *c);

/* Mount c->vols (docs/behaviour.md, 'Runtime: volumes' and 'Runtime: perNodeCache'). */
void volmount_user(struct ctx *c);

/* Open (O_PATH) path inside the container root, creating missing components while
 * their parent is the container's own rootfs (want_dir: the last one is a directory,
 * else an empty file); -1 with the reason in *why. */
int volmount_target(const struct ctx *c, const char *path, int want_dir, const char **why);

/* volmount_target for a mount the user asks for: missing components checked against the
 * user volume rules before they are made, and the path the target resolves to too. */
int volmount_user_target(const struct ctx *c, const char *path, int want_dir, const char **why);

/* Open a path with the user's filesystem identity and groups (O_PATH, symlinks followed
 * but no /proc magic links); want_dir: a directory the user can search.  -1 with errno. */
int volmount_open_as_user(const struct ident *id, const char *path, int want_dir);

/* The same for a directory, with no symbolic link anywhere on the path (ELOOP). */
int volmount_open_dir_as_user_nofollow(const struct ident *id, const char *path);

#endif
