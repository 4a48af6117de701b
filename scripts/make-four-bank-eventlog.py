#!/usr/bin/env python3
"""Derive a four-bank (SHA-1, SHA-256, SHA-384, SHA-512) crypto-agile UEFI
event log from a SHA-256-only one, for the parser and replay tests: the
recorded logs we have carry SHA-1 and SHA-256 only.

Every event keeps its PCR, type, event data and SHA-256 digest. Where that
digest is the SHA-256 of the event data (or of grub's string in it), the
other banks' digests are their hashes of the same bytes; elsewhere (a digest of a PE image, a variable read
elsewhere) they are derived from it, HASH(b"four-bank " + sha256 digest):
distinct values of the right length, not measurements of anything.
EV_NO_ACTION events get zero digests in every bank.
The Spec ID header lists the four algorithms. tpm2_eventlog replays the
result as our parser must (scripts/record-eventlog-oracle.sh).

Usage: make-four-bank-eventlog.py IN.bin OUT.bin
"""
import hashlib
import struct
import sys

EV_NO_ACTION = 0x3
BANKS = [(0x0004, "sha1"), (0x000B, "sha256"), (0x000C, "sha384"), (0x000D, "sha512")]
SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64}


def measured(event, sha256):
    """The bytes of `event` whose SHA-256 is `sha256`, if any: the whole
    data, or (grub's EV_IPL strings) the text after its "grub_cmd: " or
    "kernel_cmdline: " label, without the trailing NUL."""
    text = event.rstrip(b"\0")
    for cand in (event, text, text.split(b": ", 1)[-1]):
        if hashlib.sha256(cand).digest() == sha256:
            return cand
    return None


def main(src, dst):
    data = open(src, "rb").read()
    # Header: TCG_PCR_EVENT (SHA-1 format) holding the Spec ID event.
    pcr, etype = struct.unpack_from("<II", data, 0)
    size = struct.unpack_from("<I", data, 28)[0]
    spec = data[32:32 + size]
    pos = 32 + size
    algs = struct.unpack_from("<I", spec, 24)[0]
    sizes = dict(struct.unpack_from("<HH", spec, 28 + 4 * i) for i in range(algs))
    assert list(sizes) == [0x000B], "the input must be a SHA-256-only log"
    rest = spec[28 + 4 * algs:]
    new_spec = spec[:24] + struct.pack("<I", len(BANKS))
    new_spec += b"".join(struct.pack("<HH", a, SIZES[a]) for a, _ in BANKS) + rest
    out = bytearray(data[:28] + struct.pack("<I", len(new_spec)) + new_spec)
    events = 0
    while pos < len(data):
        pcr, etype, count = struct.unpack_from("<III", data, pos)
        pos += 12
        digests = {}
        for _ in range(count):
            alg = struct.unpack_from("<H", data, pos)[0]
            digests[alg] = data[pos + 2:pos + 2 + sizes[alg]]
            pos += 2 + sizes[alg]
        size = struct.unpack_from("<I", data, pos)[0]
        event = data[pos + 4:pos + 4 + size]
        pos += 4 + size
        base = digests[0x000B]
        out += struct.pack("<III", pcr, etype, len(BANKS))
        for alg, name in BANKS:
            if alg == 0x000B:
                d = base
            elif etype == EV_NO_ACTION:
                d = bytes(SIZES[alg])
            elif measured(event, base) is not None:
                d = hashlib.new(name, measured(event, base)).digest()
            else:
                d = hashlib.new(name, b"four-bank " + base).digest()
            out += struct.pack("<H", alg) + d
        out += struct.pack("<I", size) + event
        events += 1
    open(dst, "wb").write(out)
    print(f"{dst}: {events} events, banks {', '.join(n for _, n in BANKS)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
