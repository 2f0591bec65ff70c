/* passwd lines (ident.c) as the helper reads <etcPath>/passwd for the caller's name, the
 * ids and names in them, and the node list of setup's --nodes (hosts.c).  Group files are
 * the front ends' now (udiroot/groups.py). */
#include "fuzz.h"
#include "../hosts.h"
#include "../ident.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = fuzz_cstr(data, size), *copy = fuzz_cstr(data, size);
    char *cursor = text, *line, err[512];

    while ((line = ident_next_line(&cursor)) != NULL) {
        size_t n = strlen(line);
        char *pw = fuzz_cstr((const uint8_t *)line, n);
        struct pw_fields pf;
        unsigned long id;

        if (ident_parse_pw_line(pw, &pf) == 0)
            (void)ident_name_ok(pf.name);
        (void)ident_parse_id(line, n, &id);
        free(pw);
    }
    (void)hosts_validate(copy, err, sizeof err);
    free(text);
    free(copy);
    return 0;
}
