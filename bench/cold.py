#!/usr/bin/env python3
"""One cold start for `bench/run.sh cold`: spawn a proxy, time its first 200.

Spawns the command after `--` (pinned to --cpu: this process moves itself
there for the spawn, so the child inherits it, then moves back to
--client-cpu), and from the moment just before the spawn tries, every
--poll-ms, to connect to --port. The first accepted connection is
"listening"; on it goes `GET --path` (origin-form, Host --host,
Connection: close). A status other than 200 (or a connection closed without
an answer) is retried on a new connection after --poll-ms. The first 200
with its whole body ends the measurement; then the process gets SIGTERM
and is waited for.

Prints one JSON object: listening_ms and first_200_ms after the spawn,
token_ms and upstream_ms (when the token endpoint answered the first token
request, and the upstream the first request of a new connection: the
first line each of their logs, --token-log and --conn-log, wrote since the
spawn, whose first field, resp. fifth, is nginx's $msec), the statuses
before the 200, and the CPU time the subject's processes had used at the
first 200 (from schedstat, all threads; with --cpu-children, the
children too: nginx's worker).

    cold.py summary RUNS.jsonl   the table of `run.sh cold` from its runs
"""

import argparse
import json
import os
import signal
import socket
import sys
import time


def cpu_ms(pid, children):
    """Run time of all threads of pid (and of its children), in ms."""
    pids = [pid]
    if children:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    total = 0
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return round(total / 1e6, 2)


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def lines_since(path, n):
    with open(path) as f:
        return f.read().splitlines()[n:]


def read_response(sock):
    """(status, body length) of one HTTP/1.1 answer to Connection: close."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
    return status, len(body)


COLUMNS = [
    ("listening_ms", "listening"),
    ("token_ms", "token fetched"),
    ("upstream_ms", "upstream answered"),
    ("first_200_ms", "first 200"),
    ("cpu_ms_at_200", "CPU ms at 200"),
]


def summary(path):
    """Per subject: median (min–max) of each figure over the repetitions."""
    import statistics

    runs = [json.loads(line) for line in open(path) if line.strip()]
    subjects = list(dict.fromkeys(r["subject"] for r in runs))
    head = ["subject", "runs"] + [title for _, title in COLUMNS]
    rows = [head]
    for subj in subjects:
        rs = [r for r in runs if r["subject"] == subj]
        row = [subj, str(len(rs))]
        for key, _ in COLUMNS:
            v = [r[key] for r in rs if r.get(key) is not None]
            row.append(
                f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "–"
            )
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("ms after spawn: median (min–max)")
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    extra = [
        f"{subj}: {sum(r.get('token_requests', 0) for r in runs if r['subject'] == subj)} token requests, "
        f"{sum(r.get('new_upstream_conns', 0) for r in runs if r['subject'] == subj)} new upstream connections, "
        f"{sum(len(r.get('statuses_before_200', [])) for r in runs if r['subject'] == subj)} answers before the first 200"
        for subj in subjects
    ]
    print("\n".join(extra))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--host", default="api.bench")
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--cpu", type=int, required=True)
    ap.add_argument("--client-cpu", type=int, required=True)
    ap.add_argument("--poll-ms", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--cpu-children", action="store_true")
    ap.add_argument("--log", required=True)
    ap.add_argument("--token-log", required=True)
    ap.add_argument("--conn-log", required=True)
    ap.add_argument("--subject", required=True)
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    request = (
        f"GET {a.path} HTTP/1.1\r\nHost: {a.host}\r\nConnection: close\r\n\r\n"
    ).encode()
    poll = a.poll_ms / 1000
    log = os.open(a.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, log, 1),
        (os.POSIX_SPAWN_DUP2, log, 2),
    ]
    tok0, conn0 = count_lines(a.token_log), count_lines(a.conn_log)
    os.sched_setaffinity(0, {a.cpu})
    wall0 = time.time()
    t0 = time.monotonic()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=actions)
    os.sched_setaffinity(0, {a.client_cpu})
    os.close(log)

    result = {"mode": "cold", "rep": a.rep, "subject": a.subject}
    result["spawn_epoch_ms"] = round(wall0 * 1000, 3)
    listening = first = None
    before = []
    attempts = 0
    try:
        deadline = t0 + a.timeout
        while first is None:
            now = time.monotonic()
            if now > deadline:
                raise SystemExit(f"no 200 within {a.timeout}s (statuses {before})")
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = None
                raise SystemExit(f"the subject exited early with status {status}")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            attempts += 1
            try:
                s.connect(("127.0.0.1", a.port))
            except OSError:
                s.close()
                time.sleep(poll)
                continue
            if listening is None:
                listening = time.monotonic()
            try:
                s.sendall(request)
                status, n = read_response(s)
            except OSError:
                status, n = -2, 0
            finally:
                s.close()
            if status == 200 and n == a.body_bytes:
                first = time.monotonic()
                result["cpu_ms_at_200"] = cpu_ms(pid, a.cpu_children)
                # nginx logs a request after answering it: give the upstream
                # a moment to write the new connection's line.
                for _ in range(100):
                    if count_lines(a.conn_log) > conn0:
                        break
                    time.sleep(0.002)
            else:
                before.append(status)
                time.sleep(poll)
        tokens = lines_since(a.token_log, tok0)
        conns = lines_since(a.conn_log, conn0)
        spawn = wall0 * 1000
        result.update(
            listening_ms=round((listening - t0) * 1000, 2),
            token_ms=round(float(tokens[0].split()[0]) * 1000 - spawn, 1) if tokens else None,
            upstream_ms=round(float(conns[0].split()[4]) * 1000 - spawn, 1) if conns else None,
            first_200_ms=round((first - t0) * 1000, 2),
            statuses_before_200=before,
            connect_attempts=attempts,
            token_requests=len(tokens),
            new_upstream_conns=len(conns),
        )
        print(json.dumps(result), flush=True)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
