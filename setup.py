"""Metadata is in setup.cfg; this file only declares the optional compiled fast paths.

``optional=True``: where no C compiler or Python headers are found the build goes on without
them and tunneld runs the same code in pure Python: the HTTP head parsers
(tunneld/http1/_speedups.c says what the fast path covers), the WebSocket carrier's masking
(tunneld/core/proto/_wsmask.c) and the TLS receiver's record loop (tunneld/core/_tlsread.c).
One is not a fast path: tunneld/core/_pooltrim.c gives the empty pools of CPython's allocator
back to the OS after many sessions end; without it they stay.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("tunneld.http1._speedups", ["tunneld/http1/_speedups.c"], optional=True),
    Extension("tunneld.core.proto._wsmask", ["tunneld/core/proto/_wsmask.c"], optional=True),
    Extension("tunneld.core._pooltrim", ["tunneld/core/_pooltrim.c"], optional=True),
    Extension("tunneld.core._tlsread", ["tunneld/core/_tlsread.c"], optional=True),
])
