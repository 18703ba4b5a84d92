#!/usr/bin/env python3
"""Cold-burst check for bench/run.sh: one token request for 500 requests.

Serves a slow HTTPS token endpoint (it answers after --delay seconds, so the
burst really meets an empty token cache), starts token-injector (the command
after `--`), and as soon as the route listener accepts connections sends
--n concurrent requests, one per connection. Prints one JSON object:
how many requests got 200, how many token requests the endpoint saw, and
token-injector's own token_fetch_total / coalesced counters from /metrics.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def token_server(port, cert, key, token, delay):
    state = {"requests": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            with lock:
                state["requests"] += 1
            time.sleep(delay)
            body = json.dumps(
                {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, state


def wait_listening(port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"token-injector exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                return
        except OSError:
            time.sleep(0.002)
    raise SystemExit(f"port {port} not listening after {timeout}s")


async def one_request(port, path):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: api.bench\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await reader.read()
        writer.close()
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else -1
    except OSError:
        return -2


async def burst(port, n, path):
    return await asyncio.gather(*(one_request(port, path) for _ in range(n)))


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(r"^" + re.escape(name) + r"(\{[^}]*\})?\s+(\S+)$", line)
            if m and (m.group(1) is None or 'result="error"' not in m.group(1)):
                total += float(m.group(2))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--token-port", type=int, required=True)
    ap.add_argument("--route-port", type=int, required=True)
    ap.add_argument("--admin-port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--delay", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--log", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd

    # run.sh stops us with SIGTERM; make that run the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    httpd, state = token_server(a.token_port, a.cert, a.key, a.token, a.delay)
    with open(a.log, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        wait_listening(a.route_port, proc, 10)
        listening_ms = (time.monotonic() - t0) * 1000
        t1 = time.monotonic()
        statuses = asyncio.run(burst(a.route_port, a.n, a.path))
        burst_ms = (time.monotonic() - t1) * 1000
        with urllib.request.urlopen(f"http://127.0.0.1:{a.admin_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        result = {
            "requests": a.n,
            "ok_200": sum(1 for s in statuses if s == 200),
            "other_statuses": sorted({s for s in statuses if s != 200}),
            "token_requests_seen_by_endpoint": state["requests"],
            "token_fetch_total_success": metric_sum(
                metrics, "token_injector_token_fetch_total"
            ),
            "token_requests_coalesced_total": metric_sum(
                metrics, "token_injector_token_requests_coalesced_total"
            ),
            "token_endpoint_delay_s": a.delay,
            "start_to_listening_ms": round(listening_ms, 1),
            "burst_ms": round(burst_ms, 1),
        }
        print(json.dumps(result))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        httpd.shutdown()


if __name__ == "__main__":
    main()
