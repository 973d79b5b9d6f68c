"""Build of keepstore's one C extension (everything else is in pyproject.toml).

``keepstore._md5mb`` is multi-buffer MD5 (see keepstore/hashing.py). It is optional at build time: where it cannot
be compiled, keepstore falls back to hashlib and says so at start-up.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "keepstore._md5mb",
            ["keepstore/_md5mb.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            optional=True,
        )
    ]
)
