/* --gpu lists (gpu.c gpu_parse): "all" or comma-separated indexes. */
#include "fuzz.h"
#include "../gpu.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct gpu_plan g;
    char err[512];
    char *text = fuzz_cstr(data, size);

    memset(&g, 0, sizeof g);
    (void)gpu_parse(text, &g, err, sizeof err);
    free(text);
    return 0;
}
