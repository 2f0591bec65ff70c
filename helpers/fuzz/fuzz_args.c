/* The helpers' command lines (request.c parse_options + common_checks, run.c's own
 * options; the harness includes both): the input is NUL-separated arguments, the first
 * byte picks run's options or setup's (--user, --uid, --gid, --nodes, --ssh-pubkey, whose
 * checks, hosts_validate and sshd_check_key, run too).  common_checks re-validates the
 * image id, --local, --volume, --modules, --gpu, --gpu-cap, --gpu-file and --gpu-mount
 * against a fixed
 * udiRoot.conf (an empty imagePath, so no image is ever found; no device dir); the text
 * of --pmix-dir goes through pmix_check_path (opening it is the kernel's part). */
/* Renamed, main() loses its implicit "return 0" (it ends in usage(), which dies). */
#pragma clang diagnostic ignored "-Wreturn-type"
#define main shifter_helper_main
#include "../run.c"
#undef main
#include "../request.c"
#include "../hosts.h"
#include "../sshd.h"
#include "../pmix.h"
#include "../writable.h"
#include <stdio.h>

#include "fuzz.h"

static char image_dir[] = "/tmp/shifter-fuzz-args.XXXXXX";
static const char *setup_user, *setup_uid, *setup_gid, *setup_key;

/* setup.c's own options (it has a main of its own and is not included). */
static int setup_like(const char *a, const char *v, struct options *o)
{
    const char **slot = strcmp(a, "--user") == 0         ? &setup_user
                        : strcmp(a, "--uid") == 0        ? &setup_uid
                        : strcmp(a, "--gid") == 0        ? &setup_gid
                        : strcmp(a, "--nodes") == 0      ? &ctx.nodes
                        : strcmp(a, "--ssh-pubkey") == 0 ? &setup_key
                                                         : NULL;
    (void)o;
    if (slot == NULL || *slot != NULL)
        return 0;
    *slot = v;
    return 1;
}

static void remove_image_dir(void)
{
    rmdir(image_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static char text[8192], err[CONF_ERR_LEN];

    (void)argc;
    (void)argv;
    if (mkdtemp(image_dir) == NULL)
        abort();
    atexit(remove_image_dir);
    snprintf(text, sizeof text,
             FUZZ_BASE_CONF "imagePath=%s\nallowLocalChroot=1\n"
             "allowWritableTmpfs=1\nwritableTmpfsSizeLimit=1G\n"
             "gpuLdCache=/nonexistent/ld.so.cache\ngpuDeviceDir=/nonexistent/dev\n"
             "module_mpich_siteFs=/usr/lib/mpich:/usr/lib/mpich\nmodule_mpich_conflict=ompi\n"
             "module_ompi_siteEnv=OMPI=1\nmodule_off_enabled=0\nmodule_off_siteFs=/a:/a\n",
             image_dir);
    if (conf_parse_text(text, strlen(text), &conf, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_args: %s\n", err);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct options o;
    static char *text, *argv[258];
    static int argc;

    if (size < 1)
        return 0;
    text = fuzz_cstr(data + 1, size - 1); /* before tracking: freed below */
    argc = 0;
    for (char *p = text; p < text + size - 1 && argc < 256; p += strlen(p) + 1)
        argv[argc++] = p;
    argv[argc] = NULL;
    memset(&ctx, 0, sizeof ctx);
    ctx.conf = &conf; /* as helper_init sets it */
    setup_user = setup_uid = setup_gid = setup_key = NULL;
    g_verbose = 0;
    if (FUZZ_TRY) {
        char err[VOL_ERR_LEN];
        parse_options(argc, argv, 0, data[0] & 1 ? run_option : setup_like, &o);
        common_checks(&o);
        if (ctx.nodes != NULL)
            (void)hosts_validate(ctx.nodes, err, sizeof err);
        if (setup_key != NULL)
            (void)sshd_check_key(setup_key, err, sizeof err);
        if (o.writable != NULL)
            writable_check(&ctx, o.writable);
        if (o.pmix_dir != NULL) {
            static char canon[HELPER_MAX_PATH];
            (void)pmix_check_path(o.pmix_dir, canon, sizeof canon, err, sizeof err);
        }
    }
    fuzz_release(); /* o.volumes, ctx.vols' strings, ... */
    g_verbose = 0;
    free(text);
    return 0;
}
