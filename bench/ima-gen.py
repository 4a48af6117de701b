#!/usr/bin/env python3
"""Generate an ima-ng ascii measurement list (SHA-256 file digests, SHA-1
template hashes as the kernel logs them) and a Keylime-format runtime policy
with N_PATHS paths, for bench/ima-vs-keylime.sh.

usage: ima-gen.py N_ENTRIES N_PATHS OUTDIR
writes OUTDIR/ima.log, OUTDIR/policy.json, OUTDIR/pcr10-sha256.hex
"""
import hashlib
import json
import os
import struct
import sys


def field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def main() -> None:
    n_entries, n_paths, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.makedirs(out, exist_ok=True)
    digests = {}
    pcr = bytes(32)
    lines = []
    for i in range(n_entries):
        if i % 100 == 99:
            # 1% under /tmp: not in the policy, excluded by regex.
            path = f"/tmp/session-{i}/scratch"
        else:
            path = f"/usr/lib/gen/d{(i % n_paths) % 1000:03}/file-{i % n_paths}.so"
        digest = hashlib.sha256(path.encode()).digest()
        if not path.startswith("/tmp/"):
            digests[path] = [digest.hex()]
        data = field(b"sha256:\0" + digest) + field(path.encode() + b"\0")
        template_sha1 = hashlib.sha1(data).hexdigest()
        pcr = hashlib.sha256(pcr + hashlib.sha256(data).digest()).digest()
        lines.append(f"10 {template_sha1} ima-ng sha256:{digest.hex()} {path}\n")
    # Fill the policy up to N_PATHS paths (entries may not touch them all).
    i = 0
    while len(digests) < n_paths:
        path = f"/opt/unused/file-{i}"
        digests[path] = [hashlib.sha256(path.encode()).hexdigest()]
        i += 1
    policy = {
        "meta": {"version": 1, "generator": 0},
        "release": 0,
        "digests": digests,
        "excludes": ["/tmp/.*", "/var/log/.*"],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }
    with open(os.path.join(out, "ima.log"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(out, "policy.json"), "w") as f:
        json.dump(policy, f)
    with open(os.path.join(out, "pcr10-sha256.hex"), "w") as f:
        f.write(pcr.hex() + "\n")
    print(f"generated {n_entries} entries, {len(digests)} policy paths in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
