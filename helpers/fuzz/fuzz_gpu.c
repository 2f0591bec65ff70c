/* --gpu lists (gpu.c gpu_parse: comma-separated indexes) and --gpu-file specs
 * (gpu_add_file: lib64|lib|bin/NAME=/PATH), the same input for both. */
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
    (void)gpu_add_file(text, &g, err, sizeof err);
    free(text);
    return 0;
}
