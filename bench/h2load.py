#!/usr/bin/env python3
"""Turns one h2load run into the JSON line wrk.lua prints, for run.sh h2.

    h2load.py STDOUT_FILE LOG_FILE

STDOUT_FILE is h2load's output, LOG_FILE its --log-file (one line per
request: start time, status, duration in µs). Latencies are microseconds.
"""

import json
import re
import sys


def pct(sorted_vals, p):
    if not sorted_vals:
        return 0
    i = min(len(sorted_vals) - 1, max(0, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[i]


def main():
    out_file, log_file = sys.argv[1], sys.argv[2]
    text = open(out_file).read()
    m = re.search(r"finished in ([\d.]+)(m?s)", text)
    if not m:
        sys.exit(f"no 'finished in' line in h2load output:\n{text}")
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not req or not codes:
        sys.exit(f"unexpected h2load output:\n{text}")
    total, started, done, ok, failed, errored, timeout = map(int, req.groups())
    c2, c3, c4, c5 = map(int, codes.groups())
    connect_failed = re.search(r"(\d+) client\(s\) failed to connect", text)
    lat = []
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                lat.append(int(parts[2]))
    lat.sort()
    print(json.dumps({
        "requests": done,
        "duration_us": int(secs * 1e6),
        "bytes": 0,
        "connect_errors": int(connect_failed.group(1)) if connect_failed else 0,
        "read_errors": errored,
        "write_errors": 0,
        "status_errors": c4 + c5,
        "timeouts": timeout,
        "lat_mean_us": sum(lat) / len(lat) if lat else 0,
        "lat_max_us": lat[-1] if lat else 0,
        "p50_us": pct(lat, 50),
        "p90_us": pct(lat, 90),
        "p99_us": pct(lat, 99),
        "p999_us": pct(lat, 99.9),
    }))


if __name__ == "__main__":
    main()
