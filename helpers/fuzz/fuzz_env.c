/* The records of --env-fd and --etc-fd (request.c read_records; the harness includes
 * request.c): NUL-terminated NAME=VALUE records in a memfd. */
#include "../request.c"
#include <sys/mman.h>

#include "fuzz.h"

void usage(void) /* run.c's or setup.c's in the programs; helper_init() names it */
{
    die("usage");
}

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
        envp = read_records(fd, "environment"); /* closes fd */
    else
        close(fd); /* it died before closing it */
    if (envp != NULL)
        for (size_t i = 0; envp[i] != NULL; i++)
            if (strchr(envp[i], '=') == NULL)
                abort(); /* every record read has a '=' */
    fuzz_release(); /* envp and the records' buffer too */
    return 0;
}
