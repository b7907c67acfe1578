/* checkpoint.h: the loader on an open file, for polyak_load and the fuzzer. */
#ifndef POLYAK_CHECKPOINT_H
#define POLYAK_CHECKPOINT_H

#include "polyak.h"

#ifdef __cplusplus
extern "C" {
#endif

/* polyak_load on an open, readable file descriptor (not closed). */
polyak_status polyak_load_fd(polyak_t *p, int fd);

#ifdef __cplusplus
}
#endif

#endif /* POLYAK_CHECKPOINT_H */
