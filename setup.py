"""Build the Cython extensions: the fastpath engine and the raw bench loops."""

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
            ),
            Extension(
                "bench._rawloops",
                ["bench/_rawloops.pyx"],
                libraries=["IPSec_MB", "crypto"],
                extra_compile_args=["-O3"],
            ),
        ],
        compiler_directives={"language_level": "3"},
    )
)
