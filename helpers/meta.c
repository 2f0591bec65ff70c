/*
 * meta.c - FORMAT, USERACL and GROUPACL from an image's .meta file, with the
 * line rules of udiroot/meta.py: "KEY: value", '#' in column 0 a comment (also
 * inside a continued value), trailing '\' joins the next line with one space,
 * unknown keys ignored.  Other keys (ENTRY, CMD, ENV...) are the front end's:
 * the helper never uses them, so it does not parse them.
 * tests/test_helper_rules.py runs both readers on the same files.
 */
#define _GNU_SOURCE
#include "meta.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define WS " \t\r\n\v\f"
#define ID_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-"
#define NOT_FOUND "FAILED to find requested image."

int meta_valid_image_id(const char *id)
{
    size_t n = strlen(id);

    /* The id names files under imagePath: no '/', no "..", no leading '.', and no
     * leading '-' or '+' that a tool could take for an option. */
    return n > 0 && n <= META_MAX_ID && strspn(id, ID_CHARS) == n && id[0] != '.' &&
           id[0] != '+' && id[0] != '-' && strstr(id, "..") == NULL;
}

static char *trim(char *s)
{
    char *e;

    s += strspn(s, WS);
    e = s + strlen(s);
    while (e > s && strchr(WS, e[-1]) != NULL)
        e--;
    *e = '\0';
    return s;
}

static int parse_ids(char *value, const char *key, unsigned long *ids, size_t *n, char *err,
                     size_t errlen)
{
    char *piece = value;

    *n = 0;
    while (piece != NULL) {
        char *next = strchr(piece, ',');
        char *p;
        unsigned long v;

        if (next != NULL)
            *next++ = '\0';
        p = trim(piece);
        piece = next;
        if (*p == '\0')
            continue;
        if (ident_parse_id(p, strlen(p), &v) != 0)
            return set_err(err, errlen, "Invalid id '%.64s' in %s of image metadata", p, key);
        if (*n >= META_MAX_ACL)
            return set_err(err, errlen, "%s in image metadata lists more than %d ids", key,
                           META_MAX_ACL);
        ids[(*n)++] = v;
    }
    return *n == 0 ? set_err(err, errlen, "%s in image metadata is empty", key) : 0;
}

static int assign(struct image_meta *meta, const char *key, char *value, char *err,
                  size_t errlen)
{
    if (strcmp(key, "FORMAT") == 0) {
        /* Refused here rather than at mount time, so the front end (which reads the
         * same rule) and the helper fail alike and before anything is built. */
        if (value[0] != '\0' && strcmp(value, "squashfs") != 0 && strcmp(value, "xfs") != 0)
            return set_err(err, errlen,
                           "FAILED: image format '%.32s%s' is not supported (squashfs or xfs)",
                           value, strlen(value) > 32 ? "..." : "");
        snprintf(meta->format, sizeof meta->format, "%s", value);
    } else if (strcmp(key, "USERACL") == 0) {
        return parse_ids(value, key, meta->user_acl, &meta->n_user_acl, err, errlen);
    } else if (strcmp(key, "GROUPACL") == 0) {
        return parse_ids(value, key, meta->group_acl, &meta->n_group_acl, err, errlen);
    }
    return 0;
}

int meta_parse(char *text, struct image_meta *meta, char *err, size_t errlen)
{
    char key[256];
    char *joined = xmalloc(strlen(text) + 1); /* a joined value is never longer */
    int in_value = 0, rc = 0;
    char *line = text;

    memset(meta, 0, sizeof *meta);
    joined[0] = '\0';
    while (line != NULL && rc == 0) {
        char *nl = strchr(line, '\n'), *value;
        size_t vlen;

        if (nl != NULL)
            *nl = '\0';
        if (line[0] != '#') {
            if (!in_value) {
                char *colon = strchr(line, ':');
                if (colon == NULL)
                    goto next;
                *colon = '\0';
                snprintf(key, sizeof key, "%s", trim(line));
                value = trim(colon + 1);
            } else {
                value = trim(line);
            }
            vlen = strlen(value);
            if (in_value)
                strcat(joined, " "); /* parts are joined with one space */
            if (vlen > 0 && value[vlen - 1] == '\\') {
                value[vlen - 1] = '\0';
                strcat(joined, trim(value));
                in_value = 1;
                goto next;
            }
            strcat(joined, value);
            rc = assign(meta, key, trim(joined), err, errlen);
            joined[0] = '\0';
            in_value = 0;
        }
    next:
        line = nl != NULL ? nl + 1 : NULL;
    }
    if (rc == 0 && in_value)
        rc = assign(meta, key, trim(joined), err, errlen);
    free(joined);
    return rc;
}

int meta_load_at(int dirfd, const char *name, struct image_meta *meta, char *err,
                 size_t errlen)
{
    char *text;
    size_t len;
    int rc;

    memset(meta, 0, sizeof *meta);
    if (read_small_file_at(dirfd, name, 0, &text, &len) != 0) {
        if (errno == ENOENT)
            snprintf(err, errlen, NOT_FOUND);
        else if (errno == EINVAL) /* read_small_file_at's word for "not a regular file" */
            snprintf(err, errlen, NOT_FOUND " (%s is not a regular file)", name);
        else
            snprintf(err, errlen, NOT_FOUND " (%s: %s)", name, strerror(errno));
        return -1;
    }
    if (memchr(text, '\0', len) != NULL) {
        snprintf(err, errlen, NOT_FOUND " (%s: contains a NUL byte)", name);
        free(text);
        return -1;
    }
    rc = meta_parse(text, meta, err, errlen);
    free(text);
    return rc;
}

void meta_read(int image_dir, const char *id, struct image_meta *meta)
{
    char name[META_MAX_ID + 8], err[HELPER_MAX_PATH + 256];

    /* the image the user asked for is missing or unusable: the user's error */
    if (!meta_valid_image_id(id))
        die_user(NOT_FOUND " (invalid image id)");
    snprintf(name, sizeof name, "%s.meta", id);
    if (meta_load_at(image_dir, name, meta, err, sizeof err) != 0)
        die_user("%s", err);
}

static int listed(const unsigned long *ids, size_t n, unsigned long v)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] == v)
            return 1;
    return 0;
}

int meta_allows(const struct image_meta *meta, const struct ident *id)
{
    if (meta->n_user_acl == 0 && meta->n_group_acl == 0)
        return 1;
    if (listed(meta->user_acl, meta->n_user_acl, id->uid))
        return 1;
    if (listed(meta->group_acl, meta->n_group_acl, id->gid))
        return 1;
    for (size_t i = 0; i < id->ngroups; i++)
        if (listed(meta->group_acl, meta->n_group_acl, id->groups[i]))
            return 1;
    return 0;
}
