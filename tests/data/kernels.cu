// Test kernels. kernels.ptx is this file compiled by NVRTC (see tests/data/README.md);
// tests/emulated_kernels.py holds their host implementations for the emulated worker.
extern "C" __global__ void vec_add(const float *a, const float *b, float *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

extern "C" __global__ void axpy_mixed(float alpha, const float *x, float *y, int n, double offset)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = alpha * x[i] + y[i] + (float)offset;
}

extern "C" __global__ void scale_inplace(int *data, int factor, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) data[i] *= factor;
}

extern "C" __global__ void gpulab_noop() {}
