/*
 * ident.h - who the helper is working for, and the passwd parsing it needs (rules of
 * udiroot/groups.py).
 */
#ifndef SHIFTER_HELPERS_IDENT_H
#define SHIFTER_HELPERS_IDENT_H

#include <stddef.h>
#include <sys/types.h>

#include "conf.h"

#define IDENT_MAX_GROUPS 512
#define IDENT_MAX_NAME 256
#define IDENT_MAX_ID 0xFFFFFFFEUL

struct ident {
    uid_t uid;
    gid_t gid;
    gid_t groups[IDENT_MAX_GROUPS]; /* supplementary, gid 0 replaced by gid */
    size_t ngroups;
    char name[IDENT_MAX_NAME];
};

/* One passwd line's fields, pointing into a caller-owned copy of the line. */
struct pw_fields {
    const char *name, *gecos, *home, *shell;
    unsigned long uid, gid;
};

/* The caller of a setuid run: real ids and groups from the kernel, the name from
 * <etcPath>/passwd (or libc with allowLibcPwdCalls=1).  Dies for uid/gid 0. */
void ident_from_caller(const struct udiroot_conf *conf, struct ident *id);

/* Decimal id as groups.py reads it: 1..10 digits, at most IDENT_MAX_ID; -1 if not. */
int ident_parse_id(const char *text, size_t len, unsigned long *out);

/* Split one passwd line (modified in place) into fields; 0 or -1 when libc would skip it. */
int ident_parse_pw_line(char *line, struct pw_fields *f);

/* Iterate lines: returns the next line (NUL-terminated in place) or NULL. */
char *ident_next_line(char **cursor);

/* A name usable in passwd/group files: non-empty, bounded, no ':' ',' or control chars. */
int ident_name_ok(const char *name);

#endif
