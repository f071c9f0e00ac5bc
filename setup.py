"""Build the optional native kernels (mergekitlite/_native.c, mergekitlite/kernels/*.c); everything else is in
pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and merges run on the
torch path (same bits, slower)."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags = ["/O2", "/fp:precise"]
        else:
            # No a*b+c contraction into FMA: the kernel must round every step as torch does.
            flags = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
        for ext in self.extensions:
            ext.extra_compile_args = flags
        super().build_extensions()


setup(
    ext_modules=[
        Extension("mergekitlite._native", ["mergekitlite/_native.c"], optional=True),
        Extension("mergekitlite._gram", ["mergekitlite/kernels/gram.c"], optional=True),
    ],
    cmdclass={"build_ext": BuildExt},
)
