"""Lists the CUDA code embedded in a shared library by reading its .nv_fatbin ELF section (cuobjdump is not
part of the CUDA install on our machines). Layout: a fat binary header (magic 0xBA55ED50, header size, payload
size), then entries whose header gives kind (1 = PTX, 2 = cubin), header size, payload size and, at byte 28,
the architecture number."""

import struct
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def elf_section(data: bytes, wanted: str) -> bytes | None:
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for name, _, _, _, offset, size in headers:
        if data[names_at + name : data.index(b"\0", names_at + name)].decode() == wanted:
            return data[offset : offset + size]
    return None


def embedded_cuda_code(path) -> list[tuple[str, int]]:
    """[("ptx" | "cubin", arch number), ...] for every entry of every fat binary in the library."""
    section = elf_section(Path(path).read_bytes(), ".nv_fatbin")
    found, pos = [], 0
    while section is not None and pos + 16 <= len(section):
        magic, _, header_size, payload = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned and may be padded
            continue
        entry, end = pos + header_size, pos + header_size + payload
        while entry < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", section, entry)
            arch, = struct.unpack_from("<I", section, entry + 28)
            found.append(({1: "ptx", 2: "cubin"}.get(kind, f"kind{kind}"), arch))
            entry += entry_header + size
        pos = end
    return found
