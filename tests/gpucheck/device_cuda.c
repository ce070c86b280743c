/* device_cuda.c - device.h on a real GPU, through the CUDA runtime. */
#include <cuda_runtime_api.h>
#include <stdio.h>

#include "device.h"

static char g_error[256];
static char g_name[512];

static int failed(cudaError_t err, const char *what) {
  if (err == cudaSuccess) return 0;
  snprintf(g_error, sizeof g_error, "%s: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
  (void)cudaGetLastError();
  return 1;
}

const char *gc_device_open(void) {
  int count = 0; /* with no driver the call fails and leaves the count unset */
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    (void)cudaGetLastError();
    return NULL;
  }
  struct cudaDeviceProp prop;
  int driver = 0, runtime = 0;
  if (failed(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties")) return NULL;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  snprintf(g_name, sizeof g_name, "%s, %d SMs, cc %d.%d, %.0f GiB, driver %d, runtime %d", prop.name,
           prop.multiProcessorCount, prop.major, prop.minor, (double)prop.totalGlobalMem / (1u << 30), driver,
           runtime);
  return g_name;
}

int gc_device_is_emulated(void) { return 0; }
const char *gc_device_error(void) { return g_error; }

int gc_device_alloc(void **ptr, size_t bytes) { return failed(cudaMalloc(ptr, bytes ? bytes : 1), "cudaMalloc"); }
void gc_device_free(void *ptr) { cudaFree(ptr); }

/* cudaMemcpy from pageable memory may return before its DMA lands, and the checker's stream does
 * not wait for the legacy stream: wait here, so work enqueued next sees the data. */
int gc_device_upload(void *dst, const void *src, size_t bytes) {
  if (!bytes) return 0;
  return failed(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device") ||
         failed(cudaDeviceSynchronize(), "cudaDeviceSynchronize after an upload");
}

int gc_device_download(void *dst, const void *src, size_t bytes) { /* after all queued work, any stream */
  if (!bytes) return 0;
  return failed(cudaDeviceSynchronize(), "cudaDeviceSynchronize before a download") ||
         failed(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
}

int gc_device_sync(void) {
  if (failed(cudaDeviceSynchronize(), "cudaDeviceSynchronize")) return 1;
  return failed(cudaGetLastError(), "cudaGetLastError");
}

int gc_stream_create(kvc_stream_t *stream) {
  cudaStream_t s = NULL;
  if (failed(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags")) return 1;
  *stream = (kvc_stream_t)s;
  return 0;
}

void gc_stream_destroy(kvc_stream_t stream) {
  if (stream) cudaStreamDestroy((cudaStream_t)stream);
}

int gc_graph_supported(void) { return 1; }

int gc_graph_begin(kvc_stream_t stream) {
  return failed(cudaStreamBeginCapture((cudaStream_t)stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
}

int gc_graph_end(kvc_stream_t stream, void **exec) {
  cudaGraph_t graph = NULL;
  cudaGraphExec_t instance = NULL;
  if (failed(cudaStreamEndCapture((cudaStream_t)stream, &graph), "cudaStreamEndCapture")) return 1;
  const int bad = failed(cudaGraphInstantiate(&instance, graph, 0), "cudaGraphInstantiate");
  cudaGraphDestroy(graph);
  *exec = bad ? NULL : (void *)instance;
  return bad;
}

int gc_graph_launch(void *exec, kvc_stream_t stream) {
  return failed(cudaGraphLaunch((cudaGraphExec_t)exec, (cudaStream_t)stream), "cudaGraphLaunch");
}

int gc_stream_sync(kvc_stream_t stream) {
  return failed(cudaStreamSynchronize((cudaStream_t)stream), "cudaStreamSynchronize");
}

void gc_graph_free(void *exec) {
  if (exec) cudaGraphExecDestroy((cudaGraphExec_t)exec);
}
