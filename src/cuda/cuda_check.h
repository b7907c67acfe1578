/* cuda_check.h: CUDA runtime errors as polyak statuses (CUDA builds only). */
#ifndef POLYAK_CUDA_CHECK_H
#define POLYAK_CUDA_CHECK_H

#include <stddef.h>

#include "polyak.h"

/* Visible devices, or -1 if the runtime fails (reason in msg). */
int polyak_cuda_device_count(char *msg, size_t msg_num_bytes);

/* POLYAK_OK if `device` exists and can run the kernels; else
 * POLYAK_ERR_UNSUPPORTED (no device, no driver) or POLYAK_ERR_INVALID_ARG
 * (ordinal out of range) or POLYAK_ERR_CUDA, with the reason in msg. */
polyak_status polyak_cuda_check_device(int device, char *msg, size_t msg_num_bytes);

/* 1 if ptr is CUDA device memory (not managed or host); 0 otherwise,
 * including when no CUDA driver or device is present. */
int polyak_cuda_is_device_memory(const void *ptr);

#endif /* POLYAK_CUDA_CHECK_H */
