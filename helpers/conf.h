/*
 * conf.h - read udiRoot.conf, the site configuration the setuid helper trusts.
 *
 * The rules are those of udiroot/config.py (docs/behaviour.md, 'Runtime: udiRoot.conf'); the
 * helper reads the file itself rather than believing anything the unprivileged
 * Python front end passes it.  Limits are fixed so a hostile or broken file
 * cannot make the helper allocate without bound.
 */
#ifndef SHIFTER_HELPERS_CONF_H
#define SHIFTER_HELPERS_CONF_H

#include <stddef.h>

#define CONF_DEFAULT_PATH "/etc/shifter/udiRoot.conf"
#define CONF_MAX_FILE (1024 * 1024) /* bytes in the whole file */
#define CONF_MAX_LINE 8192          /* bytes in one logical (joined) line */
#define CONF_MAX_KEYS 256           /* distinct keys, module keys included */
#define CONF_MAX_SITEFS 64          /* siteFs lines */
#define CONF_MAX_WARNINGS 32        /* deprecated-key warnings kept */
#define CONF_ERR_LEN (CONF_MAX_LINE + 256)
#define CONF_MAX_MODULES 32     /* modules in one launch */
#define CONF_MAX_MODULE_NAME 64 /* bytes in a module name */

struct conf_entry {
    char *key;
    char *value;
};

struct udiroot_conf {
    struct conf_entry entries[CONF_MAX_KEYS]; /* plain and module_<name>_<sub> keys */
    size_t n_entries;
    char *site_fs[CONF_MAX_SITEFS]; /* in file order */
    size_t n_site_fs;
    char *warnings[CONF_MAX_WARNINGS];
    size_t n_warnings;
};

/*
 * The keys udiRoot.conf may set, each table ending in NULL.  udiroot/config.py
 * has the same tables; tests/test_helper_rules.py checks that they agree.
 *   conf_required_keys   must be set and non-empty
 *   conf_tool_keys       Shifter's external tool paths: accepted and ignored, because
 *                        this implementation runs none of those tools (a site's
 *                        existing file names them; a node need not have them)
 *   conf_optional_keys   every other plain key (siteFs, which accumulates, aside)
 *   conf_deprecated_keys accepted with an "IGNORING parameter" warning
 *   conf_defunct_keys    accepted silently (Shifter's defunct keys)
 *   conf_module_subkeys  the <sub> of module_<name>_<sub>
 */
extern const char *const conf_required_keys[];
extern const char *const conf_tool_keys[];
extern const char *const conf_optional_keys[];
extern const char *const conf_deprecated_keys[];
extern const char *const conf_defunct_keys[];
extern const char *const conf_module_subkeys[];

/* The modules a launch asked for, in order; names point into buf. */
struct conf_modules {
    char buf[CONF_MAX_MODULES * (CONF_MAX_MODULE_NAME + 1) + 64];
    const char *names[CONF_MAX_MODULES];
    size_t n;
};

/* All functions return 0 on success, -1 with a message in err on failure. */

/* Parse text (len bytes, need not be NUL-terminated); no ownership checks. */
int conf_parse_text(const char *text, size_t len, struct udiroot_conf *conf, char *err,
                    size_t errlen);

/* Refuse an opened file unless it is regular, root-owned, not group/other writable. */
int conf_check_fd(int fd, const char *path, char *err, size_t errlen);

/* Open path without following a symlink, check it, read and parse it. */
int conf_load(const char *path, struct udiroot_conf *conf, char *err, size_t errlen);

/* The value of a plain or module key, or NULL. */
const char *conf_get(const struct udiroot_conf *conf, const char *key);

/* The value of module_<name>_<sub>, or NULL. */
const char *module_get(const struct udiroot_conf *conf, const char *name, const char *sub);

/*
 * A module list (udiroot/modules.py has the same rule): "none" (any case) alone, or
 * comma-separated names, blanks (space, tab) around them trimmed, empty pieces and
 * repeats skipped.  Each name must be 1..64 of [A-Za-z0-9_.+-], set some key of
 * udiRoot.conf and not be disabled (enabled=0|false|no), else "Unknown shifter
 * module: X"; a pair where either lists the other in its space-separated conflict is
 * "ERROR: cannot load conflicting modules A and B"; at most 32 modules.
 */
int conf_select_modules(const struct udiroot_conf *conf, const char *text,
                        struct conf_modules *out, char *err, size_t errlen);

/* Free everything conf_parse_text allocated; conf is left empty and reusable. */
void conf_free(struct udiroot_conf *conf);

#endif
