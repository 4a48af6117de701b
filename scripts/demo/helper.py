#!/usr/bin/env python3
"""JSON and port chores of scripts/demo.sh, kept out of the shell script.

Commands (verdict JSON is `attestctl trust ...` output, read on stdin):

  free-ports PAIRS SINGLES distinct free loopback ports on one line: first
                           PAIRS ports P whose P+1 is free too (swtpm's
                           control channel), then SINGLES lone ports
  all-verified             exit 0 if every host has a verdict (verified_at)
  trust-is HOST TRUST      exit 0 if HOST's trust is TRUST
  summary                  one readable line per host
  host HOST                HOST's verdict, pretty-printed
  pcr-fault HOST           "PCR i (bank): expected ..., actual ..." of HOST
  pcr-actual HOST          the actual value of HOST's failing PCR
  last-failure HOST FILE SKIP
                           the last failed evaluation event of HOST in the
                           CADF JSON-lines FILE after its first SKIP lines,
                           as one line; exit 1 if there is none yet

Exit status 2 means the input was not what attestctl prints.
"""

import json
import socket
import sys


def fail(message):
    print(f"helper: {message}", file=sys.stderr)
    sys.exit(2)


def verdicts():
    try:
        value = json.load(sys.stdin)
    except json.JSONDecodeError as err:
        fail(f"not JSON: {err}")
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        fail("expected a list of host verdicts")
    return value


def verdict_of(host):
    for verdict in verdicts():
        if verdict.get("host") == host:
            return verdict
    fail(f"no verdict for host {host}")


def pcr_fault(verdict):
    for reason in verdict.get("reasons") or []:
        if reason.get("pcr"):
            return reason["pcr"]
    fail(f"{verdict.get('host')}: no reason names a PCR")


def bind_free_pair(held):
    """Bind P and P+1 and keep both bound until every port is chosen, so the
    kernel cannot hand the same port out twice."""
    for _ in range(64):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            first.close()
            second.close()
            continue
        held += [first, second]
        return port
    fail("no free pair of consecutive loopback ports")


def bind_free_port(held):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    held.append(sock)
    return sock.getsockname()[1]


def free_ports(pairs, singles):
    held = []
    ports = [bind_free_pair(held) for _ in range(pairs)]
    ports += [bind_free_port(held) for _ in range(singles)]
    for sock in held:
        sock.close()
    print(" ".join(str(p) for p in ports))


def summary():
    for verdict in verdicts():
        line = f"  {verdict.get('host')}: {verdict.get('trust')}"
        if verdict.get("verified_at"):
            line += f" (verified {verdict['verified_at']}, expires {verdict.get('expires_at')})"
        print(line)
        for reason in verdict.get("reasons") or []:
            print(f"      {reason.get('code')}: {reason.get('message')}")


def last_failure(host, path, skip):
    found = None
    try:
        with open(path, encoding="utf-8") as audit:
            for number, line in enumerate(audit):
                if number < skip or not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    # The deliverer may be mid-append; the next poll sees it whole.
                    continue
                if (
                    event.get("action") == "evaluate"
                    and event.get("outcome") == "failure"
                    and (event.get("target") or {}).get("name") == host
                ):
                    found = event
    except FileNotFoundError:
        pass
    if found is None:
        sys.exit(1)
    print(json.dumps(found))


def main(args):
    match args:
        case ["free-ports", pairs, singles] if pairs.isdigit() and singles.isdigit():
            free_ports(int(pairs), int(singles))
        case ["all-verified"]:
            sys.exit(0 if all(v.get("verified_at") for v in verdicts()) else 1)
        case ["trust-is", host, trust]:
            sys.exit(0 if verdict_of(host).get("trust") == trust else 1)
        case ["summary"]:
            summary()
        case ["host", host]:
            print(json.dumps(verdict_of(host), indent=2))
        case ["pcr-fault", host]:
            fault = pcr_fault(verdict_of(host))
            expected = " or ".join(fault.get("expected") or []) or "(none)"
            print(f"PCR {fault.get('index')} ({fault.get('bank')}):")
            print(f"    expected {expected}")
            print(f"    actual   {fault.get('actual')}")
        case ["pcr-actual", host]:
            print(pcr_fault(verdict_of(host)).get("actual") or "")
        case ["last-failure", host, path, skip] if skip.isdigit():
            last_failure(host, path, int(skip))
        case _:
            fail(f"usage: see the docstring of {sys.argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
