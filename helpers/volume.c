/*
 * volume.c - volume map rules for the setuid helper.
 *
 * Mirrors udiroot/volumes.py rule for rule and message for message;
 * tests/test_helper_rules.py checks the two against each other.  Case-folding
 * is ASCII-only (strncasecmp in the C locale): every name compared here is ASCII.
 */
#define _GNU_SOURCE
#include "volume.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util.h"

#define DENIED "Invalid mount request, permission denied!"
#define LIST_BLANKS " \t\r\n\v\f" /* what volumes.py strips around an entry */
#define SIZE_SUFFIXES "bkmgtpe"   /* index = power of 1024 */
#define MAX_SIZE_DIGITS 30

static const char *const flag_names[VOL_NFLAGS] = {"ro", "rec", "slave", "private",
                                                   "perNodeCache"};
static const char *const user_forbidden_under[] = {"/etc", "/var", "/opt/udiImage",
                                                   "/dev", "/proc", "/sys", NULL};
static const char *const user_forbidden_exact[] = {"/", "/opt", NULL};
static const char *const site_forbidden_exact[] = {
    "/", "/opt", "/etc", "/var", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", NULL,
};

/* 'Invalid volume map "<entry>": <reason>.' */
__attribute__((format(printf, 4, 5))) static int syntax_err(char *err, size_t errlen,
                                                            const char *entry, const char *fmt,
                                                            ...)
{
    char reason[VOL_MAX_TEXT + 256];
    va_list ap;

    va_start(ap, fmt);
    vset_err(reason, sizeof reason, fmt, ap);
    va_end(ap);
    return set_err(err, errlen, "Invalid volume map \"%s\": %s.", entry, reason);
}

/* DENIED " Cannot mount from <from> to <to>: <reason>." */
__attribute__((format(printf, 5, 6))) static int denied_err(char *err, size_t errlen,
                                                            const char *from, const char *to,
                                                            const char *fmt, ...)
{
    char reason[VOL_MAX_TEXT + 256];
    va_list ap;

    va_start(ap, fmt);
    vset_err(reason, sizeof reason, fmt, ap);
    va_end(ap);
    return set_err(err, errlen, DENIED " Cannot mount from %s to %s: %s.", from, to, reason);
}

int vol_parse_size(const char *text, uint64_t *out, char *err, size_t errlen)
{
    const char *p = text, *whole, *frac = "";
    size_t n_whole, n_frac = 0, power = 0;
    uint64_t w = 0, mult, rest = 0;
    unsigned char digits[MAX_SIZE_DIGITS];

    whole = p;
    while (*p >= '0' && *p <= '9')
        p++;
    n_whole = (size_t)(p - whole);
    if (*p == '.') {
        frac = ++p;
        while (*p >= '0' && *p <= '9')
            p++;
        n_frac = (size_t)(p - frac);
        if (n_frac == 0)
            goto bad;
    }
    if (n_whole == 0 || n_whole + n_frac > MAX_SIZE_DIGITS)
        goto bad;
    if (*p != '\0') {
        const char *s = strchr(SIZE_SUFFIXES, *p >= 'A' && *p <= 'Z' ? *p - 'A' + 'a' : *p);
        if (s != NULL && *p != '\0') {
            power = (size_t)(s - SIZE_SUFFIXES);
            p++;
            /* "KB" means K: a B after a multiplier letter is allowed, "bb" is not. */
            if (power > 0 && (*p == 'b' || *p == 'B'))
                p++;
        }
    }
    if (*p != '\0')
        goto bad;

    /* Whole part: value >= whole, so more than 19 significant digits is too big. */
    while (n_whole > 1 && *whole == '0') {
        whole++;
        n_whole--;
    }
    if (n_whole > 19)
        goto bad;
    for (size_t i = 0; i < n_whole; i++)
        w = w * 10 + (uint64_t)(whole[i] - '0');
    if (w > VOL_MAX_SIZE)
        goto bad;
    mult = (uint64_t)1 << (10 * power);
    if (w > VOL_MAX_SIZE / mult)
        goto bad;

    /*
     * Fraction part, exactly as volumes.py's integer arithmetic: floor(0.frac * mult).
     * Doubling the decimal digits 10*power times moves the carries into rest, so no
     * rounding and no wide integers are needed.
     */
    for (size_t i = 0; i < n_frac; i++)
        digits[i] = (unsigned char)(frac[i] - '0');
    for (size_t k = 0; k < 10 * power; k++) {
        unsigned carry = 0;
        for (size_t i = n_frac; i-- > 0;) {
            unsigned d = digits[i] * 2u + carry;
            digits[i] = (unsigned char)(d % 10);
            carry = d / 10;
        }
        rest = rest * 2 + carry;
    }
    if (rest > VOL_MAX_SIZE - w * mult)
        goto bad;
    *out = w * mult + rest;
    return 0;
bad:
    return set_err(err, errlen,
                   "invalid size '%s' (use a number with an optional b k m g t p e)", text);
}

static int cache_size(const char *value, const char *key, const char *entry, uint64_t *out,
                      char *err, size_t errlen)
{
    char msg[VOL_MAX_TEXT + 128];

    if (vol_parse_size(value, out, msg, sizeof msg) != 0)
        return syntax_err(err, errlen, entry, "perNodeCache %s: %s", key, msg);
    if (*out == 0)
        return syntax_err(err, errlen, entry, "perNodeCache %s must be more than 0", key);
    return 0;
}

/* perNodeCache=size=N[,bs=N][,method=loop][,fs=xfs]; args is writable. */
static int parse_cache(char *args, const char *entry, struct volume *vol, char *err,
                       size_t errlen)
{
    enum { K_SIZE, K_BS, K_METHOD, K_FS, K_N };
    int seen[K_N] = {0};
    uint64_t size = 0, bs = VOL_DEFAULT_BS;
    /* No arguments at all means no items, not one empty item. */
    char *item = args[0] != '\0' ? args : NULL;

    while (item != NULL) {
        char *next = strchr(item, ',');
        char *eq, *key, *value;
        int k;

        if (next != NULL)
            *next++ = '\0';
        eq = strchr(item, '=');
        if (eq == NULL || eq[1] == '\0')
            return syntax_err(err, errlen, entry, "perNodeCache option '%s' needs a value",
                              item);
        *eq = '\0';
        key = item;
        value = eq + 1;
        for (char *c = key; *c != '\0'; c++)
            if (*c >= 'A' && *c <= 'Z')
                *c = (char)(*c - 'A' + 'a');
        if (strcmp(key, "fstype") == 0)
            key = "fs"; /* so a normalised signature parses back */

        if (strcmp(key, "size") == 0)
            k = K_SIZE;
        else if (strcmp(key, "bs") == 0)
            k = K_BS;
        else if (strcmp(key, "method") == 0)
            k = K_METHOD;
        else if (strcmp(key, "fs") == 0)
            k = K_FS;
        else
            k = -1;
        if (k >= 0 && seen[k])
            return syntax_err(err, errlen, entry, "perNodeCache option %s given twice", key);
        if (k >= 0)
            seen[k] = 1;

        if (k == K_SIZE) {
            if (cache_size(value, "size", entry, &size, err, errlen) != 0)
                return -1;
        } else if (k == K_BS) {
            if (cache_size(value, "bs", entry, &bs, err, errlen) != 0)
                return -1;
        } else if (k == K_METHOD) {
            if (strcasecmp(value, "loop") != 0)
                return syntax_err(err, errlen, entry, "perNodeCache method must be loop, not %s",
                                  value);
        } else if (k == K_FS) {
            if (strcasecmp(value, "xfs") != 0)
                return syntax_err(err, errlen, entry, "perNodeCache fs must be xfs, not %s",
                                  value);
        } else {
            return syntax_err(err, errlen, entry, "unknown perNodeCache option '%s'", key);
        }
        item = next;
    }
    if (size == 0)
        return syntax_err(err, errlen, entry,
                          "perNodeCache needs size=N (for example size=10G)");
    vol->cache_size = size;
    vol->cache_bs = bs;
    return 0;
}

/* Does the flag's name (the part before any '=', len bytes) equal want, ignoring case? */
static int name_is(const char *flag, size_t len, const char *want)
{
    return len == strlen(want) && strncasecmp(flag, want, len) == 0;
}

/* One flag; flag is writable (perNodeCache arguments are cut up in place). */
static int apply_flag(struct volume *vol, char *flag, const char *entry, char *err,
                      size_t errlen)
{
    char *eq = strchr(flag, '=');
    size_t len = eq != NULL ? (size_t)(eq - flag) : strlen(flag);
    int f = -1;

    for (int i = VOL_RO; i <= VOL_PRIVATE; i++)
        if (name_is(flag, len, flag_names[i]))
            f = i;
    if (f >= 0) {
        if (eq != NULL)
            return syntax_err(err, errlen, entry, "flag %s takes no value", flag_names[f]);
    } else if (name_is(flag, len, "perNodeCache")) {
        f = VOL_CACHE;
        if (parse_cache(eq != NULL ? eq + 1 : flag + len, entry, vol, err, errlen) != 0)
            return -1;
    } else if (flag[0] == '\0') {
        return syntax_err(err, errlen, entry, "empty flag");
    } else {
        return syntax_err(err, errlen, entry, "unknown flag '%.*s'", (int)len, flag);
    }
    if (vol->flag[f])
        return syntax_err(err, errlen, entry, "flag %s given twice", flag_names[f]);
    vol->flag[f] = 1;
    vol->seen[vol->n_seen++] = (enum vol_flag)f;
    return 0;
}

/* Absolute, no control characters, no "..": returns the normalised path in *out. */
static int clean_path(const char *path, const char *raw_from, const char *raw_to,
                      const char *which, char **out, char *err, size_t errlen)
{
    char *norm, *w;
    const char *p;

    if (path[0] == '\0')
        return denied_err(err, errlen, raw_from, raw_to, "the %s is empty", which);
    if (path[0] != '/')
        return denied_err(err, errlen, raw_from, raw_to, "the %s must be an absolute path",
                          which);
    for (p = path; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            return denied_err(err, errlen, raw_from, raw_to, "the %s has a control character",
                              which);
    /* The normalised path is never longer than the original. */
    norm = malloc(strlen(path) + 1);
    if (norm == NULL)
        return set_err(err, errlen, "volume: out of memory");
    w = norm;
    p = path;
    while (*p != '\0') {
        const char *start;
        size_t len;

        while (*p == '/')
            p++;
        start = p;
        while (*p != '\0' && *p != '/')
            p++;
        len = (size_t)(p - start);
        if (len == 0 || (len == 1 && start[0] == '.'))
            continue;
        if (len == 2 && start[0] == '.' && start[1] == '.') {
            free(norm);
            return denied_err(err, errlen, raw_from, raw_to, "the %s must not contain '..'",
                              which);
        }
        *w++ = '/';
        memcpy(w, start, len);
        w += len;
    }
    if (w == norm)
        *w++ = '/';
    *w = '\0';
    *out = norm;
    return 0;
}

static int check_user(const struct volume *vol, char *err, size_t errlen)
{
    const char *to = vol->target;

    for (size_t i = 0; i < vol->n_seen; i++)
        if (vol->seen[i] != VOL_RO && vol->seen[i] != VOL_CACHE)
            return denied_err(err, errlen, vol->source, to,
                              "flag %s is for site volumes only (use ro or perNodeCache)",
                              flag_names[vol->seen[i]]);
    if (strcmp(to, "/var/tmp") == 0)
        return 0;
    if (str_in_list(to, user_forbidden_exact))
        return denied_err(err, errlen, vol->source, to, "%s is reserved for the system", to);
    for (size_t i = 0; user_forbidden_under[i] != NULL; i++)
        if (path_under(to, user_forbidden_under[i]))
            return denied_err(err, errlen, vol->source, to,
                              "%s and everything under it is reserved for the system",
                              user_forbidden_under[i]);
    return 0;
}

int vol_check_user_target(const char *from, const char *to, char *err, size_t errlen)
{
    struct volume vol;

    memset(&vol, 0, sizeof vol);
    vol.source = (char *)from;
    vol.target = (char *)to;
    return check_user(&vol, err, errlen);
}

static int check_site(const struct volume *vol, char *err, size_t errlen)
{
    if (str_in_list(vol->target, site_forbidden_exact))
        return denied_err(err, errlen, vol->source, vol->target,
                          "%s cannot be replaced by a site mount", vol->target);
    return 0;
}

/* One "from:to[:flag...]" entry; work is a writable copy of entry, cut up in place. */
static int parse_volume(const char *entry, char *work, int site, struct volume *vol, char *err,
                        size_t errlen)
{
    char *raw_from = work, *raw_to, *flags = NULL, *colon;

    memset(vol, 0, sizeof *vol);
    colon = strchr(work, ':');
    if (colon == NULL) {
        if (!site)
            return syntax_err(err, errlen, entry, "no destination given, use from:to");
        raw_to = raw_from;
    } else {
        *colon = '\0';
        raw_to = colon + 1;
        colon = strchr(raw_to, ':');
        if (colon != NULL) {
            *colon = '\0';
            flags = colon + 1;
        }
    }
    if (clean_path(raw_from, raw_from, raw_to, "source", &vol->source, err, errlen) != 0)
        goto fail;
    if (clean_path(raw_to, raw_from, raw_to, "destination", &vol->target, err, errlen) != 0)
        goto fail;
    while (flags != NULL) {
        char *next = strchr(flags, ':');
        if (next != NULL)
            *next++ = '\0';
        if (apply_flag(vol, flags, entry, err, errlen) != 0)
            goto fail;
        flags = next;
    }
    if (vol->flag[VOL_SLAVE] && vol->flag[VOL_PRIVATE]) {
        syntax_err(err, errlen, entry, "slave and private cannot both be given");
        goto fail;
    }
    if ((site ? check_site(vol, err, errlen) : check_user(vol, err, errlen)) != 0)
        goto fail;
    return 0;
fail:
    free(vol->source);
    free(vol->target);
    memset(vol, 0, sizeof *vol);
    return -1;
}

int vol_parse_map(const char *text, int site, struct volume_list *out, char *err, size_t errlen)
{
    size_t len = strlen(text);
    char *buf, *seg, *work;

    memset(out, 0, sizeof *out);
    if (len > VOL_MAX_TEXT)
        return set_err(err, errlen, "volume list is longer than %d bytes", VOL_MAX_TEXT);
    buf = strdup(text);
    work = malloc(len + 1);
    if (buf == NULL || work == NULL) {
        free(buf);
        free(work);
        return set_err(err, errlen, "volume: out of memory");
    }
    seg = buf;
    while (seg != NULL) {
        char *next = strchr(seg, ';');
        char *entry = seg, *end;

        if (next != NULL)
            *next++ = '\0';
        seg = next;
        entry += strspn(entry, LIST_BLANKS);
        end = entry + strlen(entry);
        while (end > entry && strchr(LIST_BLANKS, *(end - 1)) != NULL)
            end--;
        *end = '\0';
        /* One pair of quotes around an entry is removed, as shells leave them. */
        if (end - entry >= 2 && entry[0] == '"' && end[-1] == '"') {
            end[-1] = '\0';
            entry++;
        }
        if (entry[0] == '\0')
            continue;
        if (out->n >= VOL_MAX_ENTRIES) {
            set_err(err, errlen, "more than %d volumes", VOL_MAX_ENTRIES);
            goto fail;
        }
        memcpy(work, entry, strlen(entry) + 1);
        if (parse_volume(entry, work, site, &out->vol[out->n], err, errlen) != 0)
            goto fail;
        out->n++;
    }
    free(buf);
    free(work);
    return 0;
fail:
    free(buf);
    free(work);
    vol_list_free(out);
    return -1;
}

/* "from:to" plus flags in the fixed signature order: ro, rec, perNodeCache, slave, private. */
static char *volume_text(const struct volume *vol)
{
    size_t size = strlen(vol->source) + strlen(vol->target) + 160;
    char *out = malloc(size);
    int n;

    if (out == NULL)
        return NULL;
    n = snprintf(out, size, "%s:%s%s%s", vol->source, vol->target, vol->flag[VOL_RO] ? ":ro" : "",
                 vol->flag[VOL_REC] ? ":rec" : "");
    if (n >= 0 && (size_t)n < size && vol->flag[VOL_CACHE])
        n += snprintf(out + n, size - (size_t)n,
                      ":perNodeCache=size=%llu,bs=%llu,method=loop,fstype=xfs",
                      (unsigned long long)vol->cache_size, (unsigned long long)vol->cache_bs);
    if (n >= 0 && (size_t)n < size)
        n += snprintf(out + n, size - (size_t)n, "%s%s", vol->flag[VOL_SLAVE] ? ":slave" : "",
                      vol->flag[VOL_PRIVATE] ? ":private" : "");
    if (n < 0 || (size_t)n >= size) {
        /* Cannot happen with the size above; refuse rather than return a cut text. */
        free(out);
        return NULL;
    }
    return out;
}

static int compare_texts(const void *a, const void *b)
{
    /* strcmp compares as unsigned char: bytewise, like volumes.py's sort key. */
    return strcmp(*(char *const *)a, *(char *const *)b);
}

char *vol_signature(const struct volume_list *list)
{
    char *texts[VOL_MAX_ENTRIES];
    size_t total = 1;
    char *out = NULL;

    for (size_t i = 0; i < list->n; i++) {
        texts[i] = volume_text(&list->vol[i]);
        if (texts[i] == NULL) {
            for (size_t j = 0; j < i; j++)
                free(texts[j]);
            return NULL;
        }
        total += strlen(texts[i]) + 1;
    }
    qsort(texts, list->n, sizeof texts[0], compare_texts);
    out = malloc(total);
    if (out != NULL) {
        out[0] = '\0';
        for (size_t i = 0; i < list->n; i++) {
            if (i > 0)
                strcat(out, ";");
            strcat(out, texts[i]);
        }
    }
    for (size_t i = 0; i < list->n; i++)
        free(texts[i]);
    return out;
}

void vol_list_free(struct volume_list *list)
{
    for (size_t i = 0; i < list->n; i++) {
        free(list->vol[i].source);
        free(list->vol[i].target);
    }
    memset(list, 0, sizeof *list);
}
