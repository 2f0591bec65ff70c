/* The ld.so cache reader of --gpu (gpu.c find_libraries, static: the harness includes
 * gpu.c).  The input is written to a root-owned temporary file that gpuLdCache names.
 * The paths the cache lists are not opened: every one of them is this program's own
 * executable (an ELF file), so a fuzzed cache can never make root open a device. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static char cache_path[] = "/tmp/shifter-fuzz-ldcache.XXXXXX";

static int fuzz_open(const char *path, int flags, ...)
{
    if (strcmp(path, cache_path) == 0)
        return open(path, flags);
    return open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
}

#define open fuzz_open
#include "../gpu.c"
#undef open

#include "fuzz.h"

static struct udiroot_conf fuzz_conf;
static int cache_fd = -1;

static void remove_cache(void)
{
    unlink(cache_path);
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    static char text[512], err[CONF_ERR_LEN];

    (void)argc;
    (void)argv;
    cache_fd = mkstemp(cache_path);
    if (cache_fd < 0)
        abort();
    atexit(remove_cache);
    snprintf(text, sizeof text, FUZZ_BASE_CONF "gpuLdCache=%s\n", cache_path);
    if (conf_parse_text(text, strlen(text), &fuzz_conf, err, sizeof err) != 0)
        abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct gpu_plan g;

    if (ftruncate(cache_fd, 0) != 0 || pwrite(cache_fd, data, size, 0) != (ssize_t)size)
        abort();
    memset(&g, 0, sizeof g);
    if (FUZZ_TRY)
        find_libraries(&fuzz_conf, &g);
    fuzz_release(); /* the cache's copy, the paths found */
    return 0;
}
