/* udiRoot.conf (conf.c): the whole parser on one file's text, then the lookups. */
#include "fuzz.h"
#include "../conf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct udiroot_conf conf; /* large: keep it off the stack */
    static char err[CONF_ERR_LEN];

    if (conf_parse_text((const char *)data, size, &conf, err, sizeof err) == 0) {
        for (size_t i = 0; i < conf.n_entries; i++)
            if (conf_get(&conf, conf.entries[i].key) == NULL)
                abort(); /* a key the parser stored must be found again */
        (void)conf_get(&conf, "udiMount");
        (void)conf_get(&conf, "module_mpich_siteFs");
    }
    conf_free(&conf);
    return 0;
}
