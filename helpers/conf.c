/*
 * conf.c - udiRoot.conf parsing for the setuid helper.
 *
 * Mirrors udiroot/config.py rule for rule, and tests/test_helper_rules.py
 * checks the two against each other.  Python reads text with str methods, so
 * "line break" and "blank" below mean what Python's splitlines() and strip()
 * mean for ASCII bytes; that is why \v, \f and \x1c-\x1f appear.  Bytes from
 * 0x80 up are never blanks or breaks here.
 */
#define _GNU_SOURCE
#include "conf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

/*
 * The key tables: conf.h says what each means.  udiroot/config.py holds the same
 * tables (REQUIRED, TOOL_PATHS, OPTIONAL, DEPRECATED, MODULE_KEYS) and
 * tests/test_helper_rules.py compares them through the test driver.
 */
const char *const conf_required_keys[] = {
    "udiMount", "loopMount", "imagePath", "udiRootPath", "etcPath", "rootfsType", NULL,
};

const char *const conf_tool_keys[] = {
    "modprobePath", "insmodPath", "cpPath", "mvPath", "chmodPath", "ddPath", NULL,
};

const char *const conf_optional_keys[] = {
    "perNodeCachePath", "perNodeCacheSizeLimit", "perNodeCacheTotalSizeLimit",
    "perNodeCacheAllowedFsType",
    "usersToImport", "sitePreMountHook", "sitePostMountHook", "optUdiImage",
    "allowLocalChroot", "allowLibcPwdCalls", "populateEtcDynamically",
    "mountUdiRootWritable", "maxGroupCount", "mountPropagationStyle", "mkfsXfsPath",
    "gatewayTimeout", "siteEnv", "siteEnvAppend", "siteEnvPrepend", "siteEnvUnset",
    "siteResources", "imageGateway", "batchType", "system", "defaultImageType",
    "defaultModules", "gpuLibraries", "gpuBinaries", "gpuBinaryPath", "gpuLdCache",
    "gpuDeviceDir", "gpuProcDir", "cdiSpecDirs", "cdiMountDirs", "allowCdiHooks",
    "imageGatewayCAFile", "allowWritableTmpfs", "writableTmpfsSizeLimit", NULL,
};

const char *const conf_deprecated_keys[] = {
    "autoLoadKernelModule", "kmodBasePath", "kmodCacheFile", "optionalSshdAsRoot", NULL,
};

/* Shifter's parser skips these without a word ("defunct"); its own test files still
 * carry a blank nodeContextPrefix= line, so site files copied from them do too. */
const char *const conf_defunct_keys[] = {
    "nodeContextPrefix", NULL,
};

const char *const conf_module_subkeys[] = {
    "siteFs", "siteEnv", "siteEnvAppend", "siteEnvPrepend", "siteEnvUnset",
    "copyPath", "roothook", "userhook", "conflict", "enabled", NULL,
};

/* ASCII characters Python's str.strip() removes. */
static int is_blank(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r' ||
           (c >= 0x1c && c <= 0x1f);
}

/* ASCII characters Python's str.splitlines() ends a line at. */
static int is_break(unsigned char c)
{
    return c == '\n' || c == '\r' || c == '\v' || c == '\f' || c == 0x1c || c == 0x1d ||
           c == 0x1e;
}

/* module_<name>_<subkey>: a known subkey after a non-empty name (names may hold '_'). */
static int is_module_key(const char *key)
{
    const char *rest;
    size_t rlen;

    if (strncmp(key, "module_", 7) != 0)
        return 0;
    rest = key + 7;
    rlen = strlen(rest);
    for (size_t i = 0; conf_module_subkeys[i] != NULL; i++) {
        size_t slen = strlen(conf_module_subkeys[i]);
        if (rlen > slen + 1 && rest[rlen - slen - 1] == '_' &&
            strcmp(rest + rlen - slen, conf_module_subkeys[i]) == 0)
            return 1;
    }
    return 0;
}

const char *conf_get(const struct udiroot_conf *conf, const char *key)
{
    for (size_t i = 0; i < conf->n_entries; i++)
        if (strcmp(conf->entries[i].key, key) == 0)
            return conf->entries[i].value;
    return NULL;
}

const char *module_get(const struct udiroot_conf *conf, const char *name, const char *sub)
{
    size_t nlen = strlen(name);

    /* Matched in place rather than built into a buffer: no name is too long to look up. */
    for (size_t i = 0; i < conf->n_entries; i++) {
        const char *k = conf->entries[i].key;
        if (strncmp(k, "module_", 7) == 0 && strncmp(k + 7, name, nlen) == 0 &&
            k[7 + nlen] == '_' && strcmp(k + 8 + nlen, sub) == 0)
            return conf->entries[i].value;
    }
    return NULL;
}

/* ---- module selection (udiroot/modules.py select_modules is the same rule) ---- */

#define MODULE_NAME_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-"

static int is_tab_space(char c)
{
    return c == ' ' || c == '\t';
}

/* "none" alone (any case), blanks around it allowed. */
static int is_none(const char *t)
{
    while (is_tab_space(*t))
        t++;
    if (strncasecmp(t, "none", 4) != 0)
        return 0;
    for (t += 4; *t; t++)
        if (!is_tab_space(*t))
            return 0;
    return 1;
}

/* A module exists when udiRoot.conf sets any of its keys; enabled=0/false/no hides it. */
static int module_usable(const struct udiroot_conf *conf, const char *name)
{
    const char *enabled = module_get(conf, name, "enabled");
    int exists = 0;

    for (size_t s = 0; conf_module_subkeys[s] != NULL; s++)
        exists |= module_get(conf, name, conf_module_subkeys[s]) != NULL;
    return exists && (enabled == NULL || (strcmp(enabled, "0") != 0 &&
                                          strcasecmp(enabled, "false") != 0 &&
                                          strcasecmp(enabled, "no") != 0));
}

/* Check one trimmed, not yet listed name against conf and the modules before it. */
static int add_module(const struct udiroot_conf *conf, struct conf_modules *out, const char *w,
                      char *err, size_t errlen)
{
    const char *mine;

    if (strlen(w) > CONF_MAX_MODULE_NAME || strspn(w, MODULE_NAME_CHARS) != strlen(w) ||
        !module_usable(conf, w))
        return set_err(err, errlen, "Unknown shifter module: %s", w);
    mine = module_get(conf, w, "conflict");
    for (size_t k = 0; k < out->n; k++) {
        const char *theirs = module_get(conf, out->names[k], "conflict");
        if ((mine && str_in_words(out->names[k], mine)) || (theirs && str_in_words(w, theirs)))
            return set_err(err, errlen, "ERROR: cannot load conflicting modules %s and %s", w,
                           out->names[k]);
    }
    if (out->n >= CONF_MAX_MODULES)
        return set_err(err, errlen, "more than %d modules requested", CONF_MAX_MODULES);
    out->names[out->n++] = w;
    return 0;
}

int conf_select_modules(const struct udiroot_conf *conf, const char *text,
                        struct conf_modules *out, char *err, size_t errlen)
{
    size_t n = strlen(text);
    char *save = NULL;

    out->n = 0;
    if (n >= sizeof out->buf)
        return set_err(err, errlen, "module list longer than %zu bytes", sizeof out->buf - 1);
    memcpy(out->buf, text, n + 1);
    if (is_none(out->buf))
        return 0;
    for (char *w = strtok_r(out->buf, ",", &save); w != NULL; w = strtok_r(NULL, ",", &save)) {
        char *e;
        size_t k;

        while (is_tab_space(*w))
            w++;
        e = w + strlen(w);
        while (e > w && is_tab_space(e[-1]))
            e--;
        *e = '\0';
        for (k = 0; k < out->n && strcmp(out->names[k], w) != 0; k++)
            ;
        if (*w == '\0' || k < out->n) /* empty, or listed already: order is the first's */
            continue;
        if (add_module(conf, out, w, err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* Later lines override earlier ones, as in a Python dict. */
static int set_value(struct udiroot_conf *conf, const char *key, const char *value, char *err,
                     size_t errlen)
{
    char *copy = strdup(value);

    if (copy == NULL)
        return set_err(err, errlen, "udiRoot.conf: out of memory");
    for (size_t i = 0; i < conf->n_entries; i++) {
        if (strcmp(conf->entries[i].key, key) == 0) {
            free(conf->entries[i].value);
            conf->entries[i].value = copy;
            return 0;
        }
    }
    if (conf->n_entries >= CONF_MAX_KEYS) {
        free(copy);
        return set_err(err, errlen, "udiRoot.conf has more than %d keys", CONF_MAX_KEYS);
    }
    conf->entries[conf->n_entries].key = strdup(key);
    if (conf->entries[conf->n_entries].key == NULL) {
        free(copy);
        return set_err(err, errlen, "udiRoot.conf: out of memory");
    }
    conf->entries[conf->n_entries].value = copy;
    conf->n_entries++;
    return 0;
}

static int add_string(char **list, size_t *n, size_t max, const char *what, const char *text,
                      char *err, size_t errlen)
{
    if (*n >= max)
        return set_err(err, errlen, "udiRoot.conf has more than %zu %s", max, what);
    list[*n] = strdup(text);
    if (list[*n] == NULL)
        return set_err(err, errlen, "udiRoot.conf: out of memory");
    (*n)++;
    return 0;
}

/* One logical line, NUL-terminated and writable (it is cut in place at '='). */
static int handle_line(struct udiroot_conf *conf, char *line, size_t lineno, char *err,
                       size_t errlen)
{
    char *eq, *key, *value, *end;
    char warning[CONF_MAX_LINE + 64];

    if (line[0] == '#')
        return 0;
    eq = strchr(line, '=');
    if (eq == NULL)
        return 0;
    *eq = '\0';

    key = line;
    while (is_blank((unsigned char)*key))
        key++;
    end = key + strlen(key);
    while (end > key && is_blank((unsigned char)end[-1]))
        end--;
    *end = '\0';

    value = eq + 1;
    while (is_blank((unsigned char)*value))
        value++;
    end = value + strlen(value);
    while (end > value && is_blank((unsigned char)end[-1]))
        end--;
    *end = '\0';

    if (str_in_list(key, conf_defunct_keys))
        return 0;
    if (str_in_list(key, conf_deprecated_keys)) {
        /* A file full of deprecated keys is odd but harmless: keep the first warnings. */
        if (conf->n_warnings >= CONF_MAX_WARNINGS)
            return 0;
        if (snprintf(warning, sizeof warning, "IGNORING parameter %s, deprecated.", key) < 0)
            return set_err(err, errlen, "udiRoot.conf: cannot format warning");
        return add_string(conf->warnings, &conf->n_warnings, CONF_MAX_WARNINGS, "warnings",
                          warning, err, errlen);
    }
    if (strcmp(key, "siteFs") == 0)
        return add_string(conf->site_fs, &conf->n_site_fs, CONF_MAX_SITEFS, "siteFs lines",
                          value, err, errlen);
    if (str_in_list(key, conf_required_keys) || str_in_list(key, conf_tool_keys) ||
        str_in_list(key, conf_optional_keys) || is_module_key(key))
        return set_value(conf, key, value, err, errlen);
    return set_err(err, errlen, "Couldn't understand key: %s (udiRoot.conf line %zu)", key,
                   lineno);
}

/* Append n bytes to the logical line being built, refusing to overflow it. */
static int append(char *buf, size_t *used, const char *src, size_t n, size_t lineno, char *err,
                  size_t errlen)
{
    if (n > CONF_MAX_LINE - *used)
        return set_err(err, errlen, "udiRoot.conf line %zu: longer than %d bytes", lineno,
                       CONF_MAX_LINE);
    memcpy(buf + *used, src, n);
    *used += n;
    buf[*used] = '\0';
    return 0;
}

static int parse_lines(const char *text, size_t len, struct udiroot_conf *conf, char *err,
                       size_t errlen)
{
    /* static: too big for a comfortable stack frame; the helper is single-threaded. */
    static char buf[CONF_MAX_LINE + 1];
    size_t used = 0, pos = 0, lineno = 0, first = 0; /* first: where the logical line began */
    int pending = 0; /* buf holds continued lines waiting for their last part */

    buf[0] = '\0';
    while (pos < len) {
        size_t start = pos, end, rend;

        while (pos < len && !is_break((unsigned char)text[pos]))
            pos++;
        end = pos;
        if (pos < len)
            pos += (text[pos] == '\r' && pos + 1 < len && text[pos + 1] == '\n') ? 2 : 1;
        lineno++;
        if (!pending)
            first = lineno;

        rend = end;
        while (rend > start && is_blank((unsigned char)text[rend - 1]))
            rend--;
        if (rend > start && text[rend - 1] == '\\') {
            /* Continued: drop the backslash and blanks around it, join with one space. */
            size_t cend = rend - 1;
            while (cend > start && is_blank((unsigned char)text[cend - 1]))
                cend--;
            if (append(buf, &used, text + start, cend - start, lineno, err, errlen) != 0 ||
                append(buf, &used, " ", 1, lineno, err, errlen) != 0)
                return -1;
            pending = 1;
            continue;
        }
        if (pending) {
            while (start < end && is_blank((unsigned char)text[start]))
                start++;
        }
        if (append(buf, &used, text + start, end - start, lineno, err, errlen) != 0)
            return -1;
        if (handle_line(conf, buf, first, err, errlen) != 0)
            return -1;
        used = 0;
        buf[0] = '\0';
        pending = 0;
    }
    if (pending) {
        /* The file ended on a continuation: the joined text without its last space. */
        while (used > 0 && is_blank((unsigned char)buf[used - 1]))
            used--;
        buf[used] = '\0';
        if (handle_line(conf, buf, first, err, errlen) != 0)
            return -1;
    }
    return 0;
}

int conf_parse_text(const char *text, size_t len, struct udiroot_conf *conf, char *err,
                    size_t errlen)
{
    const char *style;

    memset(conf, 0, sizeof *conf);
    /* C strings cannot carry a NUL; a NUL in a config file is damage, not content. */
    if (memchr(text, '\0', len) != NULL)
        return set_err(err, errlen, "udiRoot.conf contains a NUL byte");
    if (parse_lines(text, len, conf, err, errlen) != 0) {
        conf_free(conf);
        return -1;
    }
    for (size_t i = 0; conf_required_keys[i] != NULL; i++) {
        const char *v = conf_get(conf, conf_required_keys[i]);
        if (v == NULL || v[0] == '\0') {
            conf_free(conf);
            return set_err(err, errlen, "required key %s is missing", conf_required_keys[i]);
        }
    }
    style = conf_get(conf, "mountPropagationStyle");
    if (style != NULL && strcmp(style, "private") != 0 && strcmp(style, "slave") != 0) {
        set_err(err, errlen, "mountPropagationStyle must be private or slave, not '%s'", style);
        conf_free(conf);
        return -1;
    }
    return 0;
}

int conf_check_fd(int fd, const char *path, char *err, size_t errlen)
{
    struct stat st;

    /* fstat on the descriptor we will read: no window for the file to be swapped. */
    if (fstat(fd, &st) != 0)
        return set_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return set_err(err, errlen, "%s is not a regular file", path);
    if (st.st_uid != 0)
        return set_err(err, errlen, "%s is not owned by root (owner uid %lu)", path,
                       (unsigned long)st.st_uid);
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        return set_err(err, errlen, "%s is writable by group or others (mode %o)", path,
                       (unsigned)(st.st_mode & 0777));
    return 0;
}

int conf_load(const char *path, struct udiroot_conf *conf, char *err, size_t errlen)
{
    char *text;
    size_t used = 0;
    int fd, rc;

    memset(conf, 0, sizeof *conf);
    /*
     * O_NOFOLLOW: whoever can plant a symlink must not choose what we trust.
     * O_NONBLOCK: opening a FIFO must not hang the helper before fstat refuses it.
     */
    fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return set_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
    if (conf_check_fd(fd, path, err, errlen) != 0) {
        close(fd);
        return -1;
    }
    /* One byte past the limit is read, so an oversized file is noticed, not truncated. */
    rc = read_all_fd(fd, CONF_MAX_FILE, &text, &used);
    if (rc != 0 && errno == EFBIG)
        set_err(err, errlen, "%s is larger than %d bytes", path, CONF_MAX_FILE);
    else if (rc != 0)
        set_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
    close(fd);
    if (rc != 0)
        return -1;
    rc = conf_parse_text(text, used, conf, err, errlen);
    free(text);
    return rc;
}

void conf_free(struct udiroot_conf *conf)
{
    for (size_t i = 0; i < conf->n_entries; i++) {
        free(conf->entries[i].key);
        free(conf->entries[i].value);
    }
    for (size_t i = 0; i < conf->n_site_fs; i++)
        free(conf->site_fs[i]);
    for (size_t i = 0; i < conf->n_warnings; i++)
        free(conf->warnings[i]);
    memset(conf, 0, sizeof *conf);
}
