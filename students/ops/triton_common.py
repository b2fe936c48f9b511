"""Device functions shared by the Triton kernels (imported only where triton is)."""
import triton
import triton.language as tl


@triton.jit
def surrogate_grad(x, alpha, SUR: tl.constexpr):
    """d spike / d x in a kernel: SUR 0 = ATan, 1 = sigmoid (the order of surrogate.SURROGATES)."""
    if SUR == 0:
        z = 1.5707963267948966 * alpha * x
        return alpha / (2.0 * (1.0 + z * z))
    sg = 1.0 / (1.0 + tl.exp(-alpha * x))
    return alpha * sg * (1.0 - sg)
