"""Metadata is in setup.cfg; this file only declares the optional compiled fast path.

``optional=True``: where no C compiler or Python headers are found the build goes on without
it and tunneld runs the same head parsers in pure Python (tunneld/http1/_speedups.c says what
the fast path covers).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tunneld.http1._speedups", ["tunneld/http1/_speedups.c"], optional=True)])
