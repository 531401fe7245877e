"""The one extension module, `_login_columns`, from login_columns.c (metadata in pyproject.toml).

Built by pip: `pip install -r requirements.txt` from the repository root (or
`pip install ./native`). The extension is optional: if it cannot be compiled (no
C compiler, no Python headers, a compile error) setuptools warns and the package
installs without it; the processor then parses in pure Python, at about two fifths
of the speed, and says so in its log. The test suite checks that it is there.
"""

from setuptools import Extension, setup

setup(
    py_modules=[],  # nothing but the extension
    ext_modules=[
        Extension(
            "_login_columns",
            ["login_columns.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ],
)
