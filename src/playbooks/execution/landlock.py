"""Linux Landlock, from Python: confine a process's files, TCP and signals before it runs LLM code.

Landlock (Linux 5.13 and later) lets an unprivileged process restrict itself, irrevocably and for
every process it starts. An isolated worker uses it to read only what Python needs (the interpreter,
the standard library, the import path), to write only its scratch folder, and, where the kernel's
Landlock ABI has them, to make no TCP connection (ABI 4) and send no signal to a process outside its
sandbox (ABI 6). Where Landlock is missing (another OS, an old kernel, a container that filters the
syscalls) :func:`restrict` reports it and does nothing, and the worker's other limits still hold.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections.abc import Iterable

__all__ = ("abi_version", "restrict")

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same on every Linux architecture
_VERSION_FLAG = 1
_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1, 2, 4, 8
_FILE_ONLY = _EXECUTE | _WRITE_FILE | _READ_FILE | 16384 | 32768  # (truncate, ioctl_dev)
_READ = _EXECUTE | _READ_FILE | _READ_DIR


def _all_fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute ... make_sym
    if abi >= 2:
        rights |= 1 << 13  # refer
    if abi >= 3:
        rights |= 1 << 14  # truncate
    if abi >= 5:
        rights |= 1 << 15  # ioctl_dev
    return rights


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is not available."""
    libc = _libc()
    if libc is None:
        return 0
    version = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION_FLAG))
    return max(0, int(version))


def restrict(read: Iterable[str], write: Iterable[str], *, network: bool) -> str:
    """Confine this process: read (and execute) only under ``read``, read and write only under
    ``write``, no TCP unless ``network``, no signals out of the sandbox. Returns what was enforced, in
    words (for the isolation report); never raises for a kernel that lacks a feature."""
    libc = _libc()
    abi = abi_version()
    if libc is None or abi < 1:
        return "filesystem: not confined (Landlock unavailable)"
    fs = _all_fs_rights(abi)
    net = 3 if abi >= 4 and not network else 0  # bind_tcp | connect_tcp
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals
    if abi >= 6:
        attr = struct.pack("=QQQ", fs, net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs, net)
    else:
        attr = struct.pack("=Q", fs)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"filesystem: not confined (landlock_create_ruleset: {os.strerror(ctypes.get_errno())})"
    try:
        for paths, rights in ((read, _READ), (write, fs)):
            for path in paths:
                _allow(libc, int(ruleset), path, rights)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return f"filesystem: not confined (no_new_privs: {os.strerror(ctypes.get_errno())})"
        if libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return f"filesystem: not confined (landlock_restrict_self: {os.strerror(ctypes.get_errno())})"
    finally:
        os.close(int(ruleset))
    parts = [f"filesystem: confined (Landlock ABI {abi})"]
    parts.append("tcp: blocked" if net else ("tcp: allowed" if network else "tcp: not confined (ABI < 4)"))
    parts.append("signals out of the sandbox: blocked" if scoped else "signals: not confined (ABI < 6)")
    return ", ".join(parts)


def _allow(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist needs no rule
    try:
        if not os.path.isdir(path):
            rights &= _FILE_ONLY
        attr = struct.pack("=Qi", rights, fd)
        buffer = ctypes.create_string_buffer(attr, len(attr))
        libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_PATH_BENEATH), buffer, ctypes.c_uint32(0))
    finally:
        os.close(fd)
