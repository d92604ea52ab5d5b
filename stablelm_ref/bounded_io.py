"""Bounded input: every file of a model directory and every JSON text is read through here.

    open_regular(path, error, root)          a regular file (never a FIFO, device or directory), opened
                                             without blocking, whose real path lies inside `root`
    read_bytes(path, limit, error, root)     its bytes, refused *before* reading when over `limit`
    read_json(path, limit, error, root)      read_bytes + parse_json
    parse_json(data, where, error)           strict UTF-8, at most MAX_JSON_ITEMS values and keys,
                                             integers of at most MAX_INT_DIGITS digits, duplicate keys
                                             refused; deep nesting, bad bytes and bad syntax -> `error`
    check_memory(nbytes, what, error)        the memory guard: refuse an allocation that cannot fit (host
                                             memory, or a GPU's free memory and CuPy's cached blocks)

Why these bounds. A FIFO or a character device in place of config.json would block the reader for
ever or stream without end; size caps stop a 50 GB "config.json" before it is read. JSON parsing
amplifies memory: Python holds each parsed value as an object of 24-200 bytes, so a 100 MB header of
`[{},{},...]` would cost gigabytes. The number of values is bounded *before* parsing by counting the
bytes that can start one (`[`, `{`, `,`, `:`): items <= 1 + count of those, so parsing costs at most
about 3 * size + MAX_JSON_ITEMS * 250 bytes (tests/test_hostile_classes.py measures it). The largest
real JSON read here, the safetensors header of a 12b model, holds ~20,000 items.

Links: a file resolved through symlinks must lie in the model directory itself, or, for a Hugging
Face cache snapshot (`<repo>/snapshots/<rev>/`, whose files link to `<repo>/blobs/<hash>`), in that
repo's blobs/ directory; a link anywhere else is refused (copy the file in if you trust it).

Every failure raises the `error` class the caller names (ConfigError, TokenizerError, CheckpointError)
with the path in the message, so each reader keeps the error contract of errors.py.
"""

from __future__ import annotations

import json
import os
import stat

MAX_JSON_ITEMS = 250_000          # values + keys in one JSON text (real files: < 25,000)
MAX_INT_DIGITS = 100              # 2**64 has 20 digits; thousands of digits cost quadratic time to convert
ITEM_STARTS = (b"[", b"{", b",", b":")


def inside(path, root, error):
    """Refuse `path` unless its real path lies in `root` (or the blobs/ of a Hub cache snapshot `root`)."""
    if root is None:
        return
    real, top = os.path.realpath(path), os.path.realpath(root)
    allowed = [top]
    if os.path.basename(os.path.dirname(top)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(top)), "blobs"))
    if not any(os.path.dirname(real) == place for place in allowed):
        raise error(f"{path}: is a link to {real}, outside the model directory; refused (copy the file into "
                    f"{root} if you trust it)")


def open_regular(path, error, root=None):
    """Open `path` for binary reading if it is a regular file (inside `root` when given).

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; fstat on the open
    descriptor then decides, so the file checked is the file read."""
    path = os.fspath(path)
    inside(path, root, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):   # a Hub cache snapshot's link whose blob is missing: an interrupted download
            raise error(f"{path}: a link to {os.readlink(path)}, which does not exist (an incomplete download?); "
                        "download the model again") from None
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                    if stat.S_ISSOCK(mode) else "not a regular file")
            raise error(f"{path}: cannot read: it is {kind}, not a regular file; model files must be plain files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, limit, error, root=None):
    """The bytes of a regular file of at most `limit` bytes (the size is checked before reading)."""
    with open_regular(path, error, root) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: {size:,} bytes, more than the {limit:,} this file may have; it is not a "
                        "genuine model file (re-download it)")
        try:
            data = f.read(size)                        # read(n) reserves n bytes: ask for the size, not the cap
            grew = f.read(1)
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if grew or len(data) != size:
        raise error(f"{path}: changed while being read; refused (read it again when it is complete)")
    return data


class _Refused(Exception):
    """Raised inside the JSON scanner's hooks; becomes the caller's error class."""


def _int(text):
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer with {digits} digits (at most {MAX_INT_DIGITS} are read)")
    return int(text)


def _object(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def parse_json(data, where, error, advice="re-download or fix the file"):
    """Parse JSON bytes (or text) with the bounds above; `where` names the file in messages, `advice` ends a
    message about JSON that does not parse (a trace's metadata says how to write it: json.dumps)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        count = sum(data.count(c) for c in ITEM_STARTS)
        if count + 1 > MAX_JSON_ITEMS:
            raise error(f"{where}: holds up to {count + 1:,} JSON values, more than the {MAX_JSON_ITEMS:,} read "
                        "here (a real model file has far fewer); refused")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not valid JSON (not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "the file is corrupt: re-download it") from None
    else:
        text = data
        count = sum(text.count(c.decode()) for c in ITEM_STARTS)
        if count + 1 > MAX_JSON_ITEMS:
            raise error(f"{where}: holds up to {count + 1:,} JSON values, more than the {MAX_JSON_ITEMS:,} read "
                        "here; refused")
    try:
        return json.loads(text, parse_int=_int, object_pairs_hook=_object)
    except _Refused as e:
        raise error(f"{where}: not valid JSON ({e}); {advice}") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply to read); {advice}") from None
    except ValueError as e:  # json.JSONDecodeError and the scanner's own limits
        raise error(f"{where}: not valid JSON ({str(e)[:200]}); {advice}") from None


def read_json(path, limit, error, root=None, what=None):
    """read_bytes + parse_json; `what` ("not a valid shard index") prefixes a parse error's reason."""
    where = os.fspath(path) + (f": {what}" if what else "")
    return parse_json(read_bytes(path, limit, error, root), where, error)


# ---- the memory guard ---------------------------------------------------------------------------

def available_memory():
    """Bytes this process can still allocate: MemAvailable (Linux), less under a cgroup memory limit;
    None when unknown (then nothing is refused)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def device_memory(xp):
    """Bytes a CuPy array module can still allocate on its GPU: the driver's free memory (cudaMemGetInfo) plus
    the free blocks of CuPy's memory pool (arrays freed earlier stay cached there, total_bytes() - used_bytes(),
    invisible to the driver; CuPy serves an allocation from them, or releases them and retries, before it gives
    up). None for any other module, or when the device cannot say."""
    try:
        free = int(xp.cuda.runtime.memGetInfo()[0])
    except Exception:  # noqa: BLE001 - NumPy, array-api-strict, or a device error: unknown
        return None
    try:
        pool = xp.get_default_memory_pool()
        cached = int(pool.total_bytes()) - int(pool.used_bytes())
    except Exception:  # noqa: BLE001 - no pool (another allocator): the driver's figure alone
        cached = 0
    return free + max(cached, 0)


def check_memory(nbytes, what, error, advice="", available=None, xp=None):
    """Refuse (raise `error`) when `nbytes` exceed the memory available now; `what` names the allocation.
    available: bytes, if the caller knows them; else with `xp` a CuPy module, the GPU's free memory
    plus CuPy's pool of cached free blocks (device_memory); else
    (or when the device cannot say) the host's, available_memory()."""
    avail = available if available is not None else device_memory(xp) if xp is not None else None
    if avail is None:
        avail = available_memory()
    if avail is not None and nbytes > avail:
        raise error(f"{what} needs {nbytes / 2**30:,.1f} GiB but only {avail / 2**30:,.1f} GiB of memory is "
                    f"free{'; ' + advice if advice else ''}")
