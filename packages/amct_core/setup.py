"""Build script of amct-core: its five optional C extensions.

``amct_core.decompose._bulge_chasing`` (plain C, no numpy headers) runs the bulge chasing of
the two-stage tridiagonal reduction on two threads, through LAPACK's own kernels or, for
float32 on a CPU with AVX-512 (picked at run time), its own fused kernels. It is optional:
without a C compiler the install goes on and the solver calls LAPACK's sequential
``?sytrd_sb2st``, which computes the same tridiagonal matrix on one core.

``amct_core.decompose._sturm_bisection`` (plain C) computes the eigenvalues of the float32
tridiagonal matrix by bisection on vectorised Sturm counts, four times faster than LAPACK's
``?sterf`` and more accurate; without it the solver calls ``?sterf``.

``amct_core.decompose._band_reduction`` (plain C) runs the first stage of that reduction,
dense to band, for float32 at band half-width 96 on a CPU with AVX-512, on two threads with its
own kernels for the symmetric product and the rank-2k update of each panel (about 15 % faster
than OpenBLAS's for these 96-wide panels); without it, or on another CPU, the panels go
through OpenBLAS.

``amct_core.decompose._band_product`` (plain C) multiplies a float32 band matrix by a block
of vectors on two threads with AVX-512, only the band's entries: the steps of the Chebyshev
filter of the band subspace iteration; without it, or on another CPU, they are matrix products
of dense slabs of the band through OpenBLAS.

``amct_core._crc32c`` sums buffers with CRC-32C (the checksum of TensorFlow checkpoints) at
memory speed; without it :mod:`amct_core.crc32c` computes it in Python, for small buffers.
"""
from setuptools import Extension, setup


def _extension(module: str, optimisation: str = "-O3") -> Extension:
    """The optional C extension ``amct_core.<module>`` from ``src/amct_core/<module>.c``: an
    install without a C compiler goes on without it."""
    path = module.replace(".", "/")
    return Extension(f"amct_core.{module}", sources=[f"src/amct_core/{path}.c"],
                     extra_compile_args=[optimisation], optional=True)


# -O3: the fused chasing kernels run 4-6 % faster than at -O2 (median of 12 chases of a
# 6144 x 6144 band, kd = 96), with the same tridiagonal matrix bit for bit.
setup(ext_modules=[_extension("decompose._bulge_chasing"),
                   _extension("decompose._sturm_bisection"),
                   _extension("decompose._band_reduction"),
                   _extension("decompose._band_product"),
                   _extension("_crc32c", "-O2")])
