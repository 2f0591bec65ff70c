/* Volume strings (volume.c): the first byte picks user (--volume) or site (siteFs)
 * rules; then the parsed list's signature and the user target rule on each entry,
 * and the size syntax on the same text. */
#include "fuzz.h"
#include "../volume.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct volume_list list;
    static char err[VOL_ERR_LEN];
    char *text, *sig;
    uint64_t bytes;
    int site;

    if (size < 1)
        return 0;
    site = data[0] & 1;
    text = fuzz_cstr(data + 1, size - 1);
    if (vol_parse_map(text, site, &list, err, sizeof err) == 0) {
        sig = vol_signature(&list);
        free(sig);
        for (size_t i = 0; i < list.n; i++)
            (void)vol_check_user_target(list.vol[i].source, list.vol[i].target, err, sizeof err);
        vol_list_free(&list);
    }
    (void)vol_parse_size(text, &bytes, err, sizeof err);
    free(text);
    return 0;
}
