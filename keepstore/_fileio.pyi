# Types of the C extension keepstore/_fileio.c (see its header comment).

from typing import overload

def finish_block(fd: int, dir_path: str, tmp_path: str, final_path: str, /) -> None: ...
def write_block(
    dir_path: str,
    tmp_path: str,
    final_path: str,
    data: bytes | memoryview,
    xattr_name: str,
    xattr_value: bytes | None,
    direct: bool = False,
    sync_parent: bool = False,
    /,
) -> int: ...
def birth_ns(fd: int, /) -> int | None: ...
def append(fd: int, data: bytes | memoryview, direct: bool = False, /) -> int: ...
@overload
def write_group(
    root_fd: int,
    items: list[tuple[str, str, str, bytes | memoryview, str, bytes | None]],
    if_absent: bool = False,
    /,
) -> list[int | OSError | None]: ...
@overload
def write_group(
    root_fd: int,
    items: list[tuple[str, str, str, bytes | memoryview, str, bytes | None]],
    if_absent: bool,
    journal: tuple[int, int, list[bytes]],
    /,
) -> tuple[list[int | OSError | None], int]: ...
