/* cuda_capture.c: what the CUDA backend can see of CUDA graph captures, so
 * that calls which a capture cannot hold (they wait for the device,
 * allocate, or change host state that replays would not change) refuse
 * instead of breaking the caller's capture: the stream a call is given,
 * the legacy default stream (its query fails with
 * cudaErrorStreamCaptureImplicit while a blocking stream is captured), and
 * the capture that the handle's last captured polyak_graph_update joined,
 * remembered until it is seen to end. */
#include "cuda_state.h"

/* `stream`'s capture status and the capture's id (0 if none). */
static cudaError_t capture_info(cudaStream_t stream, enum cudaStreamCaptureStatus *status, unsigned long long *id)
{
#if CUDART_VERSION >= 13000
  return cudaStreamGetCaptureInfo(stream, status, id, NULL, NULL, NULL, NULL);
#else
  return cudaStreamGetCaptureInfo(stream, status, id, NULL, NULL, NULL);
#endif
}

cudaError_t polyak_cuda_is_capturing(void *stream, int *capturing)
{
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing((cudaStream_t)stream, &capture);
  *capturing = capture != cudaStreamCaptureStatusNone;
  if (err == cudaErrorStreamCaptureImplicit) { /* the legacy stream, while a blocking stream is captured */
    cudaGetLastError();
    *capturing = 1;
    err = cudaSuccess;
  }
  return err;
}

polyak_status polyak_cuda_capturing(polyak_t *p, void *stream, int *capturing)
{
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = polyak_cuda_is_capturing(stream, capturing);
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "cudaStreamIsCapturing");
}

void polyak_cuda_note_capture(polyak_t *p, void *stream)
{
  cuda_state *state = p->backend;
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  if (capture_info((cudaStream_t)stream, &capture, &id) == cudaSuccess && capture == cudaStreamCaptureStatusActive) {
    state->capture_stream = stream;
    state->capture_id = id;
    state->capture_noted = 1;
  }
  cudaGetLastError();
}

polyak_status polyak_cuda_capture_under_way(polyak_t *p, int *under_way)
{
  cuda_state *state = p->backend;
  *under_way = 0;
  polyak_cuda_scope scope;
  cudaError_t err = polyak_cuda_enter(p, &scope);
  if (err == cudaSuccess)
    err = polyak_cuda_is_capturing(cudaStreamLegacy, under_way);
  if (err == cudaSuccess && !*under_way && state && state->capture_noted) {
    enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    unsigned long long id = 0;
    if (capture_info((cudaStream_t)state->capture_stream, &capture, &id) == cudaSuccess &&
        capture != cudaStreamCaptureStatusNone && id == state->capture_id)
      *under_way = 1;
    else
      state->capture_noted = 0; /* that capture ended: forget its stream */
    cudaGetLastError();
  }
  polyak_cuda_leave(&scope);
  return err == cudaSuccess ? POLYAK_OK : polyak_cuda_fail(p, err, "cudaStreamIsCapturing");
}
