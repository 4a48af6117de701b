#!/usr/bin/env python3
"""Load every CADF event in the given JSON-lines files with pycadf, the
reference implementation OpenStack uses, and fail on any rejection.

Run with `python3 -W error` so that pycadf's interoperability warnings
(non-UUID identifiers and the like) fail the check too.

Each line is either a bare CADF event or an export record with the event
under "event" (see docs/audit.md). Also checks what pycadf leaves
unchecked but DSP0262 requires of us: an explicit UTC offset in every
timestamp, resource typeURIs from the taxonomy, a correlation id tag.
"""

import json
import re
import sys

from pycadf import cadftaxonomy, cadftype, event, identifier, measurement
from pycadf import metric, reason, reporterstep, resource, tag

OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2}$")


def fail(where, problem):
    raise ValueError(f"{where}: {problem}")


def check_time(where, value):
    if not OFFSET.match(value or ""):
        fail(where, f"timestamp {value!r} has no explicit UTC offset")


def load_resource(where, d):
    if not cadftaxonomy.is_valid_resource(d.get("typeURI", "")):
        fail(where, f"resource typeURI {d.get('typeURI')!r} is not in the CADF taxonomy")
    if not identifier.is_valid(d.get("id")):
        fail(where, f"resource id {d.get('id')!r} is invalid")
    r = resource.Resource(id=d["id"], typeURI=d["typeURI"], name=d.get("name"))
    if not r.is_valid():
        fail(where, "resource rejected by pycadf")
    return r


def load_event(where, d):
    known = {"typeURI", "id", "eventType", "eventTime", "action", "outcome",
             "initiator", "target", "observer", "reason", "measurements",
             "tags", "reporterchain"}
    extra = set(d) - known
    if extra:
        fail(where, f"unknown keys {sorted(extra)}")
    if d.get("typeURI") != cadftype.CADF_VERSION_1_0_0 + "event":
        fail(where, f"typeURI {d.get('typeURI')!r}")
    if not cadftaxonomy.is_valid_action(d.get("action", "")):
        fail(where, f"action {d.get('action')!r} is not in the CADF taxonomy")
    if not cadftaxonomy.is_valid_outcome(d.get("outcome", "")):
        fail(where, f"outcome {d.get('outcome')!r} is not in the CADF taxonomy")
    check_time(where + ".eventTime", d.get("eventTime"))
    ev = event.Event(
        eventType=d["eventType"],
        id=d["id"],
        eventTime=d["eventTime"],
        action=d["action"],
        outcome=d["outcome"],
        initiator=load_resource(where + ".initiator", d["initiator"]),
        target=load_resource(where + ".target", d["target"]),
        observer=load_resource(where + ".observer", d["observer"]),
    )
    if "reason" in d:
        r = d["reason"]
        rs = reason.Reason(reasonType=r.get("reasonType"), reasonCode=r.get("reasonCode"),
                           policyType=r.get("policyType"), policyId=r.get("policyId"))
        if not rs.is_valid():
            fail(where + ".reason", "rejected by pycadf")
        ev.reason = rs
    for i, m in enumerate(d.get("measurements", [])):
        mt = metric.Metric(metricId=m["metric"]["metricId"], unit=m["metric"]["unit"],
                           name=m["metric"].get("name"))
        if not mt.is_valid():
            fail(f"{where}.measurements[{i}].metric", "rejected by pycadf")
        ms = measurement.Measurement(result=m["result"], metric=mt)
        if not ms.is_valid():
            fail(f"{where}.measurements[{i}]", "rejected by pycadf")
        ev.add_measurement(ms)
    for i, s in enumerate(d.get("reporterchain", [])):
        check_time(f"{where}.reporterchain[{i}].reporterTime", s.get("reporterTime"))
        step = reporterstep.Reporterstep(
            role=s["role"], reporterTime=s["reporterTime"],
            reporter=load_resource(f"{where}.reporterchain[{i}].reporter", s["reporter"]))
        if not step.is_valid():
            fail(f"{where}.reporterchain[{i}]", "rejected by pycadf")
        ev.add_reporterstep(step)
    if not d.get("reporterchain"):
        fail(where, "no reporterchain")
    for t in d.get("tags", []):
        tag.is_valid(t)
        ev.add_tag(t)
    if not any(t.startswith("correlation_id?value=") for t in d.get("tags", [])):
        fail(where, "no correlation_id tag")
    if not ev.is_valid():
        fail(where, "event rejected by pycadf (Event.is_valid)")
    # A round trip through pycadf keeps every field we sent.
    back = ev.as_dict()
    for key in ("id", "eventTime", "action", "outcome", "eventType", "typeURI"):
        if back.get(key) != d[key]:
            fail(where, f"{key} changed in pycadf round trip: {back.get(key)!r}")
    return ev


def main(paths):
    kinds = {}
    total = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                rec = json.loads(line)
                if rec.get("record") == "checkpoint":
                    continue
                d = rec.get("event", rec)
                load_event(f"{path}:{n}", d)
                kind = next((t for t in d.get("tags", []) if t.startswith("kind?value=")), "?")
                kinds[kind] = kinds.get(kind, 0) + 1
                total += 1
    if total == 0:
        print("check-cadf: no events found", file=sys.stderr)
        return 1
    print(f"check-cadf: {total} events accepted by pycadf; kinds: "
          + ", ".join(f"{k.split('=', 1)[-1]}={v}" for k, v in sorted(kinds.items())))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python3 -W error scripts/check-cadf.py FILE.jsonl...", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
