#!/usr/bin/env python3
"""Writes the tar_apply seed corpus: small uncompressed layers with the
features the applier handles (hardlinks, symlinks, whiteouts and opaque
directories, PAX and GNU long names, xattrs, devices, sparse files) and
hostile ones aimed at the sentinel and the symlinks out of the root that
fuzz_targets/tar_apply.rs sets up. Run from anywhere; rewrites
fuzz/corpus/tar_apply/*.tar in place, byte for byte the same each time."""

import io
import os
import tarfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "tar_apply")
MTIME = 1_600_000_000


def entry(name, kind=tarfile.REGTYPE, data=b"", mode=0o644, **kw):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = kw.pop("mtime", MTIME)
    ti.uid = kw.pop("uid", 0)
    ti.gid = kw.pop("gid", 0)
    ti.uname = kw.pop("uname", "")
    ti.gname = kw.pop("gname", "")
    for k, v in kw.items():
        setattr(ti, k, v)
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
    return ti, data


def layer(entries, fmt=tarfile.USTAR_FORMAT, pax_global=None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_global) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
        end = t.offset
    # Keep the two end-of-archive blocks, not tarfile's padding to 10 KiB.
    return buf.getvalue()[: end + 1024]


def d(name, mode=0o755, **kw):
    return entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def f(name, data, mode=0o644, **kw):
    return entry(name, tarfile.REGTYPE, data, mode=mode, **kw)


def sym(name, target):
    return entry(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def link(name, target):
    return entry(name, tarfile.LNKTYPE, linkname=target)


# --------------------------------------------------------------- raw headers


def octal(value, width):
    return ("%0*o" % (width - 1, value)).encode() + b"\0"


def raw_header(name, typeflag, size, extra=b"", magic=b"ustar\x0000", realsize=None):
    """A ustar (or, with magic b"ustar  \\0", old GNU) header block."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = octal(0o644, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = octal(size, 12)
    h[136:148] = octal(MTIME, 12)
    h[156:157] = typeflag
    h[257:265] = magic
    if extra:
        h[386 : 386 + len(extra)] = extra
    if realsize is not None:
        h[483:495] = octal(realsize, 12)
    h[148:156] = b" " * 8
    h[148:156] = ("%06o\0 " % sum(h)).encode()
    return bytes(h)


def pad(data):
    return data + b"\0" * (-len(data) % 512)


def gnu_sparse(name, realsize, segments):
    """Old GNU sparse ('S'): up to four (offset, numbytes) pairs in the header."""
    sparse = b"".join(octal(o, 12) + octal(n, 12) for o, n in segments)
    stored = sum(n for _, n in segments)
    header = raw_header(name, b"S", stored, sparse, magic=b"ustar  \0", realsize=realsize)
    data = b"".join(bytes([0x41 + i]) * n for i, (_, n) in enumerate(segments))
    return header + pad(data)


def pax_records(records):
    out = b""
    for key, value in records:
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(str(n).encode()) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def pax_sparse_1_0(name, realsize, segments):
    """GNU tar's PAX sparse format 1.0: the map leads the entry's data."""
    recs = pax_records(
        [
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", name),
            (b"GNU.sparse.realsize", str(realsize).encode()),
        ]
    )
    ext = raw_header(b"./PaxHeaders/x", b"x", len(recs)) + pad(recs)
    lines = [str(len(segments))] + [str(v) for s in segments for v in s]
    sparse_map = pad(("\n".join(lines) + "\n").encode())
    data = b"".join(b"z" * n for _, n in segments)
    body = sparse_map + data
    return ext + raw_header(b"GNUSparseFile.0/x", b"0", len(body)) + pad(body)


END = b"\0" * 1024


def seeds():
    yield "basic", layer(
        [
            d("d"),
            f("d/f", b"hello\n"),
            f("d/empty", b""),
            f("d/setuid", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000),
            sym("d/l", "f"),
            link("d/h", "d/f"),
            d("d/sub", mode=0o700),
            d("./", mode=0o755),
        ]
    )
    yield "whiteouts", layer(
        [
            f("d/.wh.f", b""),
            f(".wh.l", b""),
            d("d/sub"),
            f("d/sub/.wh..wh..opq", b""),
            f("d/sub/new", b"new"),
            f(".wh.out", b""),
            f(".wh..wh.plnk", b""),
            f(".wh..wh.aufs", b""),
        ]
    )
    yield "pax", layer(
        [
            d("p" * 120),
            f(
                "p" * 120 + "/" + "q" * 60,
                b"pax",
                uid=100000,
                gid=200000,
                uname="someone",
                pax_headers={
                    "SCHILY.xattr.user.comment": "hello",
                    "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
                    "mtime": "1600000000.123456789",
                    "atime": "1600000001.5",
                },
            ),
            sym("s", "r" * 200),
            link("h" * 150, "p" * 120 + "/" + "q" * 60),
        ],
        fmt=tarfile.PAX_FORMAT,
    )
    yield "gnu_long", layer(
        [
            d("g" * 110),
            f("g" * 110 + "/" + "n" * 110, b"gnu", uid=0o77777777 + 1),
            sym("g" * 110 + "/link", "t" * 120),
            link("g" * 110 + "/hard" + "x" * 100, "g" * 110 + "/" + "n" * 110),
        ],
        fmt=tarfile.GNU_FORMAT,
    )
    yield "devices", layer(
        [
            entry("null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            entry("disk", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
            entry("fifo", tarfile.FIFOTYPE, mode=0o644),
            entry("whiteout", tarfile.CHRTYPE, mode=0o000, devmajor=0, devminor=0),
            entry("cont", tarfile.CONTTYPE, b"contiguous"),
        ]
    )
    yield "hostile", layer(
        [
            f("../sentinel", b"escaped"),
            f("/sentinel", b"absolute"),
            f("../../../../tmp/hoist-fuzz-escape", b"escaped"),
            sym("evil", "../.."),
            f("evil/sentinel", b"through a symlink"),
            sym("abs2", "/"),
            f("abs2/sentinel", b"through an absolute symlink"),
            link("hl", "../sentinel"),
            link("hl2", "up"),
            f("out/x", b"through the root's symlink out"),
            f("abs/d/f", b"through the root's absolute symlink"),
            f("up", b"replaces the symlink, never follows it"),
            f("l/f2", b"through a symlink inside"),
            f("d/../../sentinel", b"dotdot inside"),
            f(".wh...", b""),
            f("d/.wh.../sentinel", b""),
            sym("loop", "loop"),
            f("loop/x", b""),
        ],
        fmt=tarfile.GNU_FORMAT,
    )
    yield "replace", layer(
        [
            f("x", b"file"),
            d("x"),
            f("x/y", b"below"),
            f("x", b"file again"),
            sym("d", "x"),
            d("d"),
            link("l", "x"),
            f("l", b"replaced hardlink"),
        ]
    )
    yield "global_pax", layer(
        [f("g", b"global", pax_headers={"comment": "c"})],
        fmt=tarfile.PAX_FORMAT,
        pax_global={"mtime": "1.0", "uid": "7"},
    )
    yield "gnu_sparse", gnu_sparse(b"sparse", 20000, [(4096, 600), (12000, 100)]) + END
    yield "pax_sparse", pax_sparse_1_0(b"psparse", 10000, [(0, 10), (5000, 20)]) + END
    yield "empty", END


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(OUT, name + ".tar"), "wb") as out:
            out.write(data)


if __name__ == "__main__":
    main()
