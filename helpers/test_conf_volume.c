/*
 * test_conf_volume - drives conf.c, volume.c and meta.c from the command line
 * so tests/test_helper_rules.py can compare them with the Python rules.
 *
 *   test_conf_volume conf FILE         key=value lines (sorted), then siteFs lines
 *                                      in file order; warnings on stderr
 *   test_conf_volume volume SPEC       signature of a user volume list
 *   test_conf_volume site-volume SPEC  signature of a siteFs volume list
 *   test_conf_volume size TEXT         the size in bytes
 *   test_conf_volume tables -          "<table> <key>" for each key table of conf.h
 *   test_conf_volume image-id ID       "valid" or "invalid" (meta_valid_image_id)
 *   test_conf_volume meta FILE         FORMAT=, USERACL=, GROUPACL= lines (ids
 *                                      comma-separated) of a .meta file
 *   test_conf_volume modules FILE LIST the modules LIST selects under udiRoot.conf
 *                                      FILE, one a line
 *   test_conf_volume flag VALUE        "1" or "0": config_flag(VALUE, 0), then the
 *                                      same with default 1
 *
 * Errors go to stderr and exit 1.  Not installed; the helper proper links the
 * same files.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "meta.h"
#include "util.h"
#include "volume.h"

static int compare_entries(const void *a, const void *b)
{
    return strcmp(((const struct conf_entry *)a)->key, ((const struct conf_entry *)b)->key);
}

static int run_conf(const char *path)
{
    static struct udiroot_conf conf; /* large: keep it off the stack */
    static char err[CONF_ERR_LEN];

    if (conf_load(path, &conf, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    qsort(conf.entries, conf.n_entries, sizeof conf.entries[0], compare_entries);
    for (size_t i = 0; i < conf.n_entries; i++)
        printf("%s=%s\n", conf.entries[i].key, conf.entries[i].value);
    for (size_t i = 0; i < conf.n_site_fs; i++)
        printf("siteFs=%s\n", conf.site_fs[i]);
    for (size_t i = 0; i < conf.n_warnings; i++)
        fprintf(stderr, "%s\n", conf.warnings[i]);
    conf_free(&conf);
    return 0;
}

static int run_volume(const char *spec, int site)
{
    static struct volume_list list;
    static char err[VOL_ERR_LEN];
    char *sig;

    if (vol_parse_map(spec, site, &list, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    sig = vol_signature(&list);
    vol_list_free(&list);
    if (sig == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    printf("%s\n", sig);
    free(sig);
    return 0;
}

static int run_size(const char *text)
{
    static char err[VOL_ERR_LEN];
    uint64_t n;

    if (vol_parse_size(text, &n, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    printf("%llu\n", (unsigned long long)n);
    return 0;
}

static void print_table(const char *name, const char *const *keys)
{
    for (size_t i = 0; keys[i] != NULL; i++)
        printf("%s %s\n", name, keys[i]);
}

static int run_tables(void)
{
    print_table("required", conf_required_keys);
    print_table("tool", conf_tool_keys);
    print_table("optional", conf_optional_keys);
    print_table("deprecated", conf_deprecated_keys);
    print_table("defunct", conf_defunct_keys);
    print_table("module", conf_module_subkeys);
    return 0;
}

static void print_ids(const char *key, const unsigned long *ids, size_t n)
{
    printf("%s=", key);
    for (size_t i = 0; i < n; i++)
        printf("%s%lu", i ? "," : "", ids[i]);
    printf("\n");
}

static int run_meta(const char *path)
{
    static struct image_meta meta; /* large: keep it off the stack */
    static char err[8192];

    if (meta_load_at(AT_FDCWD, path, &meta, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    printf("FORMAT=%s\n", meta.format);
    print_ids("USERACL", meta.user_acl, meta.n_user_acl);
    print_ids("GROUPACL", meta.group_acl, meta.n_group_acl);
    return 0;
}

static int run_modules(const char *path, const char *list)
{
    static struct udiroot_conf conf;
    static struct conf_modules mods;
    static char err[CONF_ERR_LEN];
    int rc = 0;

    if (conf_load(path, &conf, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (conf_select_modules(&conf, list, &mods, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        rc = 1;
    } else {
        for (size_t i = 0; i < mods.n; i++)
            printf("%s\n", mods.names[i]);
    }
    conf_free(&conf);
    return rc;
}

/* The mode's exit status, or -1 for an unknown mode or a wrong argument count. */
static int dispatch(int argc, char **argv)
{
    const char *mode = argv[1];

    if (argc == 4 && strcmp(mode, "modules") == 0)
        return run_modules(argv[2], argv[3]);
    if (argc != 3)
        return -1;
    if (strcmp(mode, "conf") == 0)
        return run_conf(argv[2]);
    if (strcmp(mode, "volume") == 0)
        return run_volume(argv[2], 0);
    if (strcmp(mode, "site-volume") == 0)
        return run_volume(argv[2], 1);
    if (strcmp(mode, "size") == 0)
        return run_size(argv[2]);
    if (strcmp(mode, "tables") == 0)
        return run_tables();
    if (strcmp(mode, "image-id") == 0) {
        printf("%s\n", meta_valid_image_id(argv[2]) ? "valid" : "invalid");
        return 0;
    }
    if (strcmp(mode, "meta") == 0)
        return run_meta(argv[2]);
    if (strcmp(mode, "flag") == 0) {
        printf("%d%d\n", config_flag(argv[2], 0), config_flag(argv[2], 1));
        return 0;
    }
    return -1;
}

int main(int argc, char **argv)
{
    int rc = argc < 2 ? -1 : dispatch(argc, argv);

    if (rc < 0) {
        fprintf(stderr,
                "usage: %s conf FILE | volume SPEC | site-volume SPEC | size TEXT | tables - "
                "| image-id ID | meta FILE | modules FILE LIST | flag VALUE\n",
                argv[0]);
        return 2;
    }
    /* A failed write (full disk, closed pipe) must not look like success. */
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "cannot write output\n");
        return 1;
    }
    return rc;
}
