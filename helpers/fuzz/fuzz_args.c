/* The helper's command line (main.c parse_options + common_checks, static: the harness
 * includes main.c): the input is NUL-separated arguments, the first byte picks run or
 * setup.  common_checks re-validates the image id, --local, --volume, --modules, --gpu,
 * --nodes and --ssh-pubkey against a fixed udiRoot.conf (an empty imagePath, so no
 * image is ever found; no device dir and no ld.so cache, so --gpu finds nothing). */
/* Renamed, main() loses its implicit "return 0" (it ends in usage(), which dies). */
#pragma clang diagnostic ignored "-Wreturn-type"
#define main shifter_helper_main
#include "../main.c"
#undef main
#include <stdio.h>

#include "fuzz.h"

static char image_dir[] = "/tmp/shifter-fuzz-args.XXXXXX";

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
    g_verbose = 0;
    if (FUZZ_TRY) {
        parse_options(argc, argv, 0, data[0] & 1, &o);
        common_checks(&o);
    }
    fuzz_release(); /* o.volumes, ctx.vols' strings, ... */
    g_verbose = 0;
    free(text);
    return 0;
}
