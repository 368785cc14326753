"""Names the cffi module and builds rcopy's nbdkit filters; everything else is in pyproject.toml.

The filters (native/rcopy_peer_filter.c: the export admits only the primary's link address;
native/rcopy_unmap_filter.c: zero runs unmap whole thin pool blocks) are built against nbdkit's headers
(Debian: nbdkit-plugin-dev) and shipped as rcopy/nbdkit-rcopy-*.so. nbdkit loads a filter only if it
was built for the very same nbdkit version; without the headers the build skips them, and the agent
then warns and relies on mutual TLS alone, and writes zero runs as zeroes (rcopy.sys.nbdkit).
"""
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

FILTERS = {"native/rcopy_peer_filter.c": "nbdkit-rcopy-peer.so", "native/rcopy_unmap_filter.c": "nbdkit-rcopy-unmap.so"}
FILTER_HEADER = "/usr/include/nbdkit-filter.h"


class BuildExt(build_ext):
    def run(self):
        super().run()
        if not os.path.exists(FILTER_HEADER):
            print(f"warning: {FILTER_HEADER} missing (apt-get install nbdkit-plugin-dev): "
                  f"building rcopy without its nbdkit filters")
            return
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
        cc = new_compiler()
        customize_compiler(cc)
        for source, name in FILTERS.items():
            objects = cc.compile([source], output_dir=self.build_temp,
                                 extra_postargs=["-O2", "-fPIC", "-Wall", "-Wextra", "-Werror"])
            out = os.path.join("rcopy" if self.inplace else os.path.join(self.build_lib, "rcopy"), name)
            cc.link_shared_object(objects, out)


setup(cffi_modules=["native/build_ffi.py:ffibuilder"], cmdclass={"build_ext": BuildExt})
