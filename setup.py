"""Build of keepstore's three small C extensions (everything else is in pyproject.toml).

``keepstore._md5mb`` is multi-buffer MD5 (see keepstore/hashing.py); ``keepstore._fileio`` commits a block write
in one call without the GIL (keepstore/volumes/directory.py); ``keepstore._reqparse`` parses simple block requests
for the fast path (keepstore/http/protocol.py). All are optional at build time: where they cannot be compiled,
keepstore falls back to hashlib, to the same system calls made from Python, and to aiohttp's parser.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "keepstore._md5mb",
            ["keepstore/_md5mb.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            optional=True,
        ),
        Extension(
            "keepstore._fileio",
            ["keepstore/_fileio.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
            optional=True,
        ),
        Extension(
            "keepstore._reqparse",
            ["keepstore/_reqparse.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
            optional=True,
        ),
    ]
)
