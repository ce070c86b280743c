/* device_emu.c - device.h under the SIMT emulator (kvcompress_emu): its CUDA backend runs kernels
 * synchronously on host memory, so device memory is plain aligned host memory and there are no
 * streams or graphs. */
#include <stdlib.h>
#include <string.h>

#include "device.h"

const char *gc_device_open(void) { return "SIMT emulator (tests/simt): device memory is host memory"; }
int gc_device_is_emulated(void) { return 1; }
const char *gc_device_error(void) { return "host allocation failed"; }

int gc_device_alloc(void **ptr, size_t bytes) {
  *ptr = NULL;
  return posix_memalign(ptr, 256, bytes ? bytes : 1) != 0;
}

void gc_device_free(void *ptr) { free(ptr); }

int gc_device_upload(void *dst, const void *src, size_t bytes) {
  if (bytes) memcpy(dst, src, bytes);
  return 0;
}

int gc_device_download(void *dst, const void *src, size_t bytes) {
  if (bytes) memcpy(dst, src, bytes);
  return 0;
}

int gc_device_sync(void) { return 0; }

int gc_stream_create(kvc_stream_t *stream) {
  *stream = NULL;
  return 0;
}

void gc_stream_destroy(kvc_stream_t stream) { (void)stream; }

int gc_graph_supported(void) { return 0; }
int gc_graph_begin(kvc_stream_t stream) { return (void)stream, 1; }
int gc_graph_end(kvc_stream_t stream, void **exec) { return (void)stream, *exec = NULL, 1; }
int gc_graph_launch(void *exec, kvc_stream_t stream) { return (void)exec, (void)stream, 1; }
int gc_stream_sync(kvc_stream_t stream) { return (void)stream, 0; }
void gc_graph_free(void *exec) { (void)exec; }
