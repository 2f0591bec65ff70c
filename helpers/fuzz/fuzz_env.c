/* The command's environment records (main.c read_env, static: the harness includes
 * main.c): NUL-terminated NAME=VALUE records in a memfd, as --env-fd passes them. */
/* Renamed, main() loses its implicit "return 0" (it ends in usage(), which dies). */
#pragma clang diagnostic ignored "-Wreturn-type"
#define main shifter_helper_main
#include "../main.c"
#undef main
#include <sys/mman.h>

#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd;
    static char **envp;

    fd = memfd_create("fuzz-env", MFD_CLOEXEC);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size)
        abort();
    envp = NULL;
    if (FUZZ_TRY)
        envp = read_env(fd); /* closes fd */
    else
        close(fd); /* it died before closing it */
    if (envp != NULL)
        for (size_t i = 0; envp[i] != NULL; i++)
            if (strchr(envp[i], '=') == NULL)
                abort(); /* every record read has a '=' */
    fuzz_release(); /* envp and the records' buffer too */
    return 0;
}
