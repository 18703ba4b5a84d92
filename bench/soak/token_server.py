#!/usr/bin/env python3
"""Token endpoint for bench/soak.sh: client credentials over HTTPS.

Every successful POST /token issues a NEW token "tok-<seq>-<expiry ms>" with
expires_in = --lifetime. POST /control/down?secs=X makes /token answer
503 {"error":"temporarily_unavailable"} for X seconds (a "blip").
GET /control/stats returns counts. Every token request and every blip is
appended to --log as one JSON line (wall-clock seconds).
"""
import argparse
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LOCK = threading.Lock()
STATE = {"seq": 0, "down_until": 0.0, "ok": 0, "failed": 0, "blips": 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--lifetime", type=float, default=5.0)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    logf = open(args.log, "a", buffering=1)

    def log(obj):
        with LOCK:
            logf.write(json.dumps(obj) + "\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send_json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if urlparse(self.path).path == "/control/stats":
                with LOCK:
                    self.send_json(200, dict(STATE))
            else:
                self.send_json(404, {"error": "not_found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(n).decode(errors="replace")) if n else {}
            url = urlparse(self.path)
            now = time.time()
            if url.path == "/control/down":
                secs = float(parse_qs(url.query).get("secs", ["1.5"])[0])
                with LOCK:
                    STATE["down_until"] = now + secs
                    STATE["blips"] += 1
                log({"event": "down", "from": now, "until": now + secs})
                self.send_json(200, {"down_until": now + secs})
                return
            if url.path != "/token":
                self.send_json(404, {"error": "not_found"})
                return
            if form.get("grant_type") != ["client_credentials"] or "Authorization" not in self.headers:
                log({"event": "token", "t": now, "ok": False, "why": "bad_request"})
                with LOCK:
                    STATE["failed"] += 1
                self.send_json(400, {"error": "invalid_request"})
                return
            with LOCK:
                down = now < STATE["down_until"]
                if down:
                    STATE["failed"] += 1
                else:
                    STATE["seq"] += 1
                    STATE["ok"] += 1
                    seq = STATE["seq"]
            if down:
                log({"event": "token", "t": now, "ok": False, "why": "down"})
                self.send_json(503, {"error": "temporarily_unavailable",
                                     "error_description": "soak blip"})
                return
            exp = now + args.lifetime
            token = f"tok-{seq}-{int(exp * 1000)}"
            log({"event": "token", "t": now, "ok": True, "token": token, "exp": exp})
            self.send_json(200, {"access_token": token, "token_type": "Bearer",
                                 "expires_in": args.lifetime})

    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
