"""Builds the processor's one native module, in place: `python setup.py build_ext --inplace`.

`make run`, `make test` and `make bench` do this for you. Without the module the
processor still works, with the pure-Python parser, at about a third of the speed
(it says so in its start-up log).
"""

from setuptools import Extension, setup

setup(
    packages=[],  # the Python modules are run from the repository, not installed
    py_modules=[],
    ext_modules=[
        Extension(
            "_login_columns",
            ["native/login_columns.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        )
    ],
)
