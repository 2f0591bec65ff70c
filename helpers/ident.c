/*
 * ident.c - the caller's identity.  The kernel says who the caller is
 * (getresuid/getresgid/getgroups); only the user name is looked up, in the
 * site's <etcPath>/passwd unless allowLibcPwdCalls=1 (docs/behaviour.md, 'Runtime: identity').
 */
#define _GNU_SOURCE
#include "ident.h"

#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

#define NO_USER "Failed to lookup username or attempted to run as root."

int ident_parse_id(const char *text, size_t len, unsigned long *out)
{
    unsigned long v = 0;

    if (len == 0 || len > 10)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -1;
        v = v * 10 + (unsigned long)(text[i] - '0');
    }
    if (v > IDENT_MAX_ID)
        return -1;
    *out = v;
    return 0;
}

char *ident_next_line(char **cursor)
{
    char *line = *cursor, *nl;
    size_t n;

    if (line == NULL || *line == '\0')
        return NULL;
    nl = strchr(line, '\n');
    if (nl != NULL) {
        *nl = '\0';
        *cursor = nl + 1;
    } else {
        *cursor = line + strlen(line);
    }
    n = strlen(line);
    if (n > 0 && line[n - 1] == '\r')
        line[n - 1] = '\0';
    return line;
}

int ident_parse_pw_line(char *line, struct pw_fields *f)
{
    char *field[7];
    size_t n = 0;
    char *p = line;

    for (;;) {
        if (n == 7)
            return -1; /* an eighth field */
        field[n++] = p;
        p = strchr(p, ':');
        if (p == NULL)
            break;
        *p++ = '\0';
    }
    if (n != 7 || field[0][0] == '\0')
        return -1;
    if (ident_parse_id(field[2], strlen(field[2]), &f->uid) != 0 ||
        ident_parse_id(field[3], strlen(field[3]), &f->gid) != 0)
        return -1;
    f->name = field[0];
    f->gecos = field[4];
    f->home = field[5];
    f->shell = field[6];
    return 0;
}

int ident_name_ok(const char *name)
{
    size_t n = strlen(name);

    if (n == 0 || n >= IDENT_MAX_NAME)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x20 || c == 0x7f || c == ':' || c == ',' || c == '/' || c == '"' ||
            c == '\\')
            return 0;
    }
    return 1;
}

static int open_etc(const struct udiroot_conf *conf)
{
    const char *etc = conf_get(conf, "etcPath");
    int fd = open(etc, O_PATH | O_DIRECTORY | O_CLOEXEC);

    if (fd < 0)
        die_errno("Cannot open etcPath %s", etc);
    return fd;
}

/* Name of uid in <etcPath>/passwd; 0 when found. */
static int name_from_etc(const struct udiroot_conf *conf, uid_t uid, char *out, size_t len)
{
    int dfd = open_etc(conf);
    char *text, *cursor, *line;
    size_t tlen;
    int found = -1;

    if (read_small_file_at(dfd, "passwd", 1, &text, &tlen) != 0)
        die_errno("Cannot read %s/passwd", conf_get(conf, "etcPath"));
    close(dfd);
    cursor = text;
    while (found != 0 && (line = ident_next_line(&cursor)) != NULL) {
        struct pw_fields f;
        if (ident_parse_pw_line(line, &f) == 0 && f.uid == uid &&
            strlen(f.name) < len) {
            snprintf(out, len, "%s", f.name);
            found = 0;
        }
    }
    free(text);
    return found;
}

static void lookup_name(const struct udiroot_conf *conf, struct ident *id)
{
    int found;

    if (config_flag(conf_get(conf, "allowLibcPwdCalls"), 0)) {
        struct passwd *pw = getpwuid(id->uid);
        found = pw != NULL && strlen(pw->pw_name) < sizeof id->name ? 0 : -1;
        if (found == 0)
            snprintf(id->name, sizeof id->name, "%s", pw->pw_name);
    } else {
        found = name_from_etc(conf, id->uid, id->name, sizeof id->name);
    }
    if (found != 0 || !ident_name_ok(id->name))
        die(NO_USER);
}

void ident_from_caller(const struct udiroot_conf *conf, struct ident *id)
{
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;
    gid_t raw[IDENT_MAX_GROUPS];
    int n;

    memset(id, 0, sizeof *id);
    if (getresuid(&ruid, &euid, &suid) != 0 || getresgid(&rgid, &egid, &sgid) != 0)
        die_errno("Cannot read the caller's ids");
    if (ruid == 0 || rgid == 0)
        die(NO_USER);
    id->uid = ruid;
    id->gid = rgid;
    n = getgroups(IDENT_MAX_GROUPS, raw);
    if (n < 0 && errno == EINVAL)
        die("You are in more than %d groups; shifter cannot keep them all", IDENT_MAX_GROUPS);
    if (n < 0)
        die_errno("Cannot read the caller's groups");
    for (int i = 0; i < n; i++)
        id->groups[id->ngroups++] = raw[i] == 0 ? rgid : raw[i];
    lookup_name(conf, id);
}
