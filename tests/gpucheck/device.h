/*
 * device.h - the few device operations kvc-gpucheck needs, so the same checker runs on a GPU
 * (device_cuda.c: the CUDA runtime) and on the SIMT emulator (device_emu.c: device memory is host
 * memory, work is synchronous, no graphs). Every int-returning call returns 0 on success; on
 * failure gc_device_error() says why.
 */
#ifndef KVC_GPUCHECK_DEVICE_H
#define KVC_GPUCHECK_DEVICE_H

#include <stddef.h>

#include "kvcompress.h"

/* One line naming the device ("NVIDIA H200, 132 SMs, cc 9.0, driver 13000" or the emulator), or
 * NULL when there is none (then the checker cannot run its CUDA half). */
const char *gc_device_open(void);
int gc_device_is_emulated(void);
const char *gc_device_error(void);

int gc_device_alloc(void **ptr, size_t bytes); /* 256-byte aligned */
void gc_device_free(void *ptr);
int gc_device_upload(void *dst, const void *src, size_t bytes);
int gc_device_download(void *dst, const void *src, size_t bytes);
int gc_device_sync(void); /* waits for all work; reports a kernel fault */

int gc_stream_create(kvc_stream_t *stream); /* non-blocking; NULL on the emulator */
void gc_stream_destroy(kvc_stream_t stream);

/* CUDA graphs: capture everything enqueued on `stream` between begin and end, then replay it. */
int gc_graph_supported(void);
int gc_graph_begin(kvc_stream_t stream);
int gc_graph_end(kvc_stream_t stream, void **exec); /* instantiates; *exec for launch / free */
int gc_graph_launch(void *exec, kvc_stream_t stream);
int gc_stream_sync(kvc_stream_t stream);
void gc_graph_free(void *exec);

#endif /* KVC_GPUCHECK_DEVICE_H */
