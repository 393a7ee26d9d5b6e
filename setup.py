"""Build the fastpath Cython extension (intel-ipsec-mb and libcrypto)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "fastpath._engine",
                ["fastpath/_engine.pyx"],
                libraries=["IPSec_MB", "crypto"],
                extra_compile_args=["-O3"],
                define_macros=[("_GNU_SOURCE", "1")],
            )
        ],
        compiler_directives={"language_level": "3"},
    )
)
