/* --gpu and --gpu-cap lists (gpu.c gpu_parse, gpu_parse_caps: comma-separated numbers),
 * --gpu-file specs (gpu_add_file: lib64|lib|bin/NAME=/PATH) and --gpu-mount specs
 * (gpu_add_mount: /TARGET=/SOURCE), the same input for all. */
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
    (void)gpu_parse_caps(text, &g, err, sizeof err);
    (void)gpu_add_mount(text, &g, err, sizeof err);
    for (size_t i = 0; i < g.n_mounts; i++)
        free(g.mounts[i].target);
    free(text);
    return 0;
}
