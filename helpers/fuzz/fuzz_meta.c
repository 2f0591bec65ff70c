/* <id>.meta (meta.c): FORMAT and the image ACLs, then the ACL check. */
#include "fuzz.h"
#include "../meta.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct image_meta meta;
    static struct ident id = {.uid = 1001, .gid = 1001, .groups = {1003, 4242}, .ngroups = 2};
    char err[512];
    char *text = fuzz_cstr(data, size);

    memset(&meta, 0, sizeof meta);
    if (meta_parse(text, &meta, err, sizeof err) == 0)
        (void)meta_allows(&meta, &id);
    free(text);
    return 0;
}
