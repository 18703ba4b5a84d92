#!/usr/bin/env python3
"""Controller and verdict of bench/soak.sh.

  soak.py drive  ...   the timeline while wrk runs: samples RSS and fds,
                       takes the token endpoint down (blips), reloads the config
  soak.py verdict DIR  reads everything the run left in DIR and judges it
"""
import argparse
import glob
import json
import os
import re
import signal
import ssl
import sys
import time
import urllib.request

# --------------------------------------------------------------------- util


def scrape(admin_port):
    """Prometheus text -> {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def metric(snap, name, **labels):
    want = set(labels.items())
    return sum(v for (n, ls), v in snap.items() if n == name and want <= set(ls))


def metric_by(snap, name, key):
    res = {}
    for (n, ls), v in snap.items():
        if n == name:
            d = dict(ls)
            k = tuple(d.get(x, "") for x in key)
            res[k] = res.get(k, 0) + v
    return res


def proc_sample(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return rss, fds, threads


def http_code(url, proxy=None, timeout=5):
    handlers = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return f"error: {e}"


# -------------------------------------------------------------------- drive


def drive(a):
    out = a.out
    ev = open(os.path.join(out, "events.jsonl"), "a", buffering=1)
    samples = open(os.path.join(out, "samples.csv"), "w", buffering=1)
    samples.write("t,elapsed_s,rss_kib,fds,threads\n")

    def event(kind, **kw):
        kw.update(event=kind, t=time.time())
        ev.write(json.dumps(kw) + "\n")

    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    ctx = ssl.create_default_context(cafile=a.ca)
    base_cfg = open(a.config_base).read()
    extra_cfg = open(a.config_extra).read()

    def write_config(with_extra):
        tmp = a.config + ".new"
        with open(tmp, "w") as f:
            f.write(base_cfg + (extra_cfg if with_extra else ""))
        os.rename(tmp, a.config)  # rename over the old file, as an editor does

    m0 = scrape(a.admin_port)
    json.dump({"t": time.time(), "metrics": [[n, sorted(ls), v] for (n, ls), v in m0.items()]},
              open(os.path.join(out, "metrics-start.json"), "w"))
    t0 = time.time()
    end = t0 + a.duration
    event("start", duration=a.duration)
    next_sample = t0
    next_blip = t0 + a.blip_first
    next_reload = t0 + a.reload_every
    reload_n = 0
    extra_on = False
    while not stop and time.time() < end:
        now = time.time()
        if now >= next_sample:
            try:
                rss, fds, threads = proc_sample(a.pid)
            except OSError:
                event("proxy_gone")
                print("token-injector is gone", file=sys.stderr)
                sys.exit(1)
            samples.write(f"{now:.3f},{now - t0:.1f},{rss},{fds},{threads}\n")
            next_sample += a.sample_every
        if a.blip_every > 0 and now >= next_blip and now + a.blip_secs < end - 1:
            req = urllib.request.Request(
                f"https://localhost:{a.token_port}/control/down?secs={a.blip_secs}", method="POST", data=b"")
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    r.read()
                event("blip", secs=a.blip_secs)
            except OSError as e:
                event("blip_failed", error=str(e))
            next_blip += a.blip_every
        if a.reload_every > 0 and now >= next_reload and now < end - 5:
            reload_n += 1
            before = scrape(a.admin_port)
            ok0 = metric(before, "token_injector_config_reloads_total", result="success")
            err0 = metric(before, "token_injector_config_reloads_total", result="error")
            if reload_n % 2 == 1:
                extra_on = not extra_on
                write_config(extra_on)
                method = "file (" + ("add" if extra_on else "remove") + " route api2.bench)"
            else:
                os.kill(a.pid, signal.SIGHUP)
                method = "SIGHUP (file unchanged)"
            deadline, ok1, err1 = time.time() + 5, ok0, err0
            while time.time() < deadline:
                time.sleep(0.1)
                snap = scrape(a.admin_port)
                ok1 = metric(snap, "token_injector_config_reloads_total", result="success")
                err1 = metric(snap, "token_injector_config_reloads_total", result="error")
                if ok1 > ok0 or err1 > err0:
                    break
            took = time.time() - now
            # The second route answers while configured, and is gone when not.
            code = http_code(f"http://127.0.0.1:{a.extra_port}/1k")
            via_proxy = http_code("http://api2.bench/1k", proxy=f"http://127.0.0.1:{a.proxy_port}")
            route_ok = (code == 200 and via_proxy == 200) if extra_on else (
                code != 200 and via_proxy == 403)
            event("reload", n=reload_n, method=method, success_delta=ok1 - ok0, error_delta=err1 - err0,
                  took_s=round(took, 3), route2_listener=code, route2_via_proxy=via_proxy,
                  route2_expected=extra_on, route_ok=route_ok)
            print(f"{time.strftime('%H:%M:%S')} reload {reload_n} by {method}: success +{ok1 - ok0:.0f}, "
                  f"error +{err1 - err0:.0f}, {took:.2f} s; api2.bench listener {code}, via proxy {via_proxy}"
                  f" ({'as expected' if route_ok else 'NOT as expected'})", file=sys.stderr)
            next_reload += a.reload_every
        time.sleep(0.1)
    event("end")
    m1 = scrape(a.admin_port)
    json.dump({"t": time.time(), "metrics": [[n, sorted(ls), v] for (n, ls), v in m1.items()]},
              open(os.path.join(out, "metrics-end.json"), "w"))


# ------------------------------------------------------------------ verdict


def load_metrics(path):
    d = json.load(open(path))
    return d["t"], {(n, frozenset(tuple(x) for x in ls)): v for n, ls, v in d["metrics"]}


def verdict(a):
    d = a.dir
    cfg = json.load(open(os.path.join(d, "settings.json")))
    lifetime, skew = cfg["token_lifetime_s"], cfg["expiry_skew_s"]
    lines = []

    def say(s=""):
        lines.append(s)

    failures = []

    # -- traffic
    wrk = {}
    for f in sorted(glob.glob(os.path.join(d, "wrk-*.out"))):
        name = os.path.basename(f)[4:-4]
        m = [l for l in open(f) if l.startswith("SOAKJSON ")]
        if not m:
            failures.append(f"wrk {name}: no SOAKJSON line (see {f})")
            continue
        wrk[name] = json.loads(m[-1][9:])
    total = sum(w["requests"] for w in wrk.values())
    ok = sum(w["ok_2xx"] for w in wrk.values())
    sock = {k: sum(w[k] for w in wrk.values()) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")}
    n_sock = sum(sock.values())

    # -- token endpoint log
    issued, fetch_fail, downs = [], [], []
    for l in open(os.path.join(d, "token-endpoint.jsonl")):
        e = json.loads(l)
        if e["event"] == "down":
            downs.append((e["from"], e["until"]))
        elif e["ok"]:
            issued.append((e["t"], e["exp"], e["token"]))
        else:
            fetch_fail.append(e["t"])
    issued.sort()
    tokens = {tok: (t, exp) for t, exp, tok in issued}

    def endpoint_down(t, slack=0.0):
        return any(f - slack <= t <= u + slack for f, u in downs)

    # After the endpoint returns, requests that find no usable token wake the
    # renewal; the first retry comes within retry_max_without_token.
    recovery_cap = cfg.get("retry_max_without_token_s", 2.0)

    def returned_before(t):
        # The end of the latest blip that ended before t, if any.
        ends = [u for f, u in downs if u < t]
        return max(ends) if ends else None

    def usable_until(t):
        # Latest moment any token issued before t may be sent (expiry - skew).
        best = 0.0
        for it, exp, _ in issued:
            if it > t:
                break
            best = max(best, exp - skew)
        return best

    # -- classify each non-2xx response
    classes = {}
    examples = {}
    errs = []
    for f in glob.glob(os.path.join(d, "errors.*")):
        for l in open(f):
            parts = l.split()
            if len(parts) < 3:
                continue
            t, status, why = float(parts[0]), int(parts[1]), parts[2]
            # 50 ms of slack for the time between the proxy's token request
            # and the endpoint's clock, and between a response and its log line.
            valid = t < usable_until(t - 0.05) - 0.05
            if valid:
                cls = "token valid: proxy should have served"
            elif endpoint_down(t, slack=0.05):
                cls = "allowed: token endpoint down and token expired"
            elif returned_before(t) is not None and t - returned_before(t) <= recovery_cap + 0.05:
                cls = f"allowed: recovering, within {recovery_cap:g} s of the endpoint's return"
            else:
                cls = "token endpoint up but token expired (renewal backoff)"
            key = (cls, status, why)
            errs.append((t, cls, status, why))
            classes[key] = classes.get(key, 0) + 1
            examples.setdefault(key, t)
    n_non2xx = sum(w["non_2xx"] for w in wrk.values())
    allowed = sum(v for (c, _, _), v in classes.items() if c.startswith("allowed"))
    not_allowed = n_non2xx - allowed + n_sock

    say(f"traffic: {total} requests in {cfg['duration_s']} s ({total / max(cfg['duration_s'], 1):.0f}/s), "
        f"{ok} 2xx, {n_non2xx} non-2xx, {n_sock} socket errors {sock}")
    for name, w in wrk.items():
        say(f"  {name}: {w['requests']} requests, {w['non_2xx']} non-2xx, p50 {w['p50_us'] / 1000:.2f} ms, "
            f"p99 {w['p99_us'] / 1000:.2f} ms, max {w['lat_max_us'] / 1000:.1f} ms")
    for (c, status, why), v in sorted(classes.items()):
        say(f"  {v} x {status} {why}: {c} (first at {time.strftime('%H:%M:%S', time.gmtime(examples[(c, status, why)]))} UTC)")
    # Episodes: non-2xx responses less than 0.5 s apart, with the blip and
    # the token endpoint's answers around them.
    errs.sort()
    episodes = []
    for e in errs:
        if episodes and e[0] - episodes[-1]["end"] < 0.5:
            episodes[-1]["end"] = e[0]
            episodes[-1]["n"] += 1
            episodes[-1]["classes"].add(e[1])
        else:
            episodes.append({"start": e[0], "end": e[0], "n": 1, "classes": {e[1]}})

    def hms(t):
        return time.strftime("%H:%M:%S", time.gmtime(t)) + f"{t % 1:.3f}"[1:]

    for ep in episodes:
        s0, s1 = ep["start"], ep["end"]
        blip = [f"{hms(f)}-{hms(u)}" for f, u in downs if f - 6 <= s0 <= u + 6]
        prev = [(it, exp) for it, exp, _ in issued if it <= s0]
        last_tok = f"last token issued {hms(prev[-1][0])}, usable until {hms(prev[-1][1] - skew)}" if prev else "no token"
        fails = [hms(t) for t in fetch_fail if s0 - 6 <= t <= s1]
        nxt = [it for it, _, _ in issued if it > s0 - 0.05]
        say(f"  episode {hms(s0)}-{hms(s1)} UTC ({s1 - s0:.3f} s, {ep['n']} non-2xx): {last_tok}; "
            f"blip {', '.join(blip) or 'none'}; refused fetches at {', '.join(fails) or '-'}; "
            f"next token issued {hms(nxt[0]) if nxt else '-'}")
    # Per blip that outlasted the token: how long 503s went on after the
    # endpoint came back (the recovery the retry_max_without_token cap bounds).
    recoveries = []
    starts = sorted(f for f, _ in downs)
    for f, u in downs:
        # Up to the next blip: its errors are its own.
        until = min([s for s in starts if s > u] + [u + 30])
        after = [t for t, cls, _, _ in errs if u < t < until and not cls.startswith("token valid")]
        during = [t for t, _, _, _ in errs if f <= t <= u]
        if during or after:
            recoveries.append(max(after) - u if after else 0.0)
    if recoveries:
        say(f"blips that outlasted the token: {len(recoveries)}; 503s after the endpoint's return lasted "
            f"max {max(recoveries):.2f} s, mean {sum(recoveries) / len(recoveries):.2f} s "
            f"(allowed {recovery_cap:g} s)")
    logged = sum(classes.values())
    if logged != n_non2xx:
        say(f"  ({n_non2xx - logged} non-2xx not in the error logs; counted as not allowed)")
    if not_allowed:
        failures.append(f"{not_allowed} failed requests the proxy could have served "
                        f"({n_non2xx - allowed} non-2xx, {n_sock} socket errors)")
    if total == 0:
        failures.append("no traffic")

    # -- tokens seen by the upstream (sample)
    sample_n = bad_unknown = bad_expired = 0
    latest_margin = None
    p = os.path.join(d, "upstream-sample.log")
    if os.path.exists(p):
        for l in open(p):
            parts = l.split()
            if len(parts) < 4 or parts[1] == "401":
                if len(parts) >= 2 and parts[1] == "401":
                    sample_n += 1
                    bad_unknown += 1
                continue
            sample_n += 1
            t, tok = float(parts[0]), parts[3]
            if tok not in tokens:
                bad_unknown += 1
            else:
                margin = tokens[tok][1] - t
                latest_margin = margin if latest_margin is None else min(latest_margin, margin)
                if margin < 0:
                    bad_expired += 1
    say(f"upstream sample ({sample_n} requests, ~1 %): {bad_unknown} with a token not issued (or 401), "
        f"{bad_expired} with an expired token; least time left on a sent token "
        f"{'n/a' if latest_margin is None else f'{latest_margin:.2f} s'}")
    if bad_unknown or bad_expired:
        failures.append(f"upstream saw {bad_unknown} unknown and {bad_expired} expired tokens")

    # -- RSS and fds
    rows = [l.strip().split(",") for l in open(os.path.join(d, "samples.csv")).readlines()[1:]]
    rows = [(float(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows if len(r) == 5]
    dur = rows[-1][0] if rows else 0
    first = [r for r in rows if r[0] < 60] or rows
    last = [r for r in rows if r[0] >= dur - 60] or rows
    rss_first, rss_last = max(r[1] for r in first), max(r[1] for r in last)
    fd_first, fd_last = max(r[2] for r in first), max(r[2] for r in last)
    th_first, th_last = max(r[3] for r in first), max(r[3] for r in last)
    rss_tol = rss_first * cfg["rss_tolerance_pct"] / 100 + 1024
    rss_ok = rss_last <= rss_first + rss_tol
    fd_ok = fd_last <= fd_first + cfg["fd_tolerance"]
    say(f"RSS: first-minute max {rss_first} kB ({rss_first / 1024:.1f} MiB), last-minute max {rss_last} kB "
        f"({rss_last / 1024:.1f} MiB), {(rss_last - rss_first) / max(rss_first, 1) * 100:+.1f} % "
        f"(allowed +{cfg['rss_tolerance_pct']} % + 1 MiB) -> {'ok' if rss_ok else 'GROWTH'}; "
        f"overall min {min(r[1] for r in rows)} max {max(r[1] for r in rows)} kB, {len(rows)} samples")
    say(f"fds: first-minute max {fd_first}, last-minute max {fd_last} (allowed +{cfg['fd_tolerance']}) -> "
        f"{'ok' if fd_ok else 'GROWTH'}; overall min {min(r[2] for r in rows)} max {max(r[2] for r in rows)}; "
        f"threads {th_first} -> {th_last}")
    if dur < 150:
        say("  (run shorter than 2.5 min: the first and last minute overlap, so growth is hard to see)")
    if not rss_ok:
        failures.append(f"RSS grew {rss_first} -> {rss_last} kB")
    if not fd_ok:
        failures.append(f"fds grew {fd_first} -> {fd_last}")

    # -- token fetches
    t0, m0 = load_metrics(os.path.join(d, "metrics-start.json"))
    t1, m1 = load_metrics(os.path.join(d, "metrics-end.json"))
    span = t1 - t0
    prof = cfg["profile"]
    f_ok = metric(m1, "token_injector_token_fetch_total", profile=prof, result="success") - \
        metric(m0, "token_injector_token_fetch_total", profile=prof, result="success")
    f_err = metric(m1, "token_injector_token_fetch_total", profile=prof, result="error") - \
        metric(m0, "token_injector_token_fetch_total", profile=prof, result="error")
    lo_iv, hi_iv = cfg["renew_lo_s"], cfg["renew_hi_s"]
    n_blips = sum(1 for f, u in downs if t0 <= f <= t1)
    blip_secs = cfg["blip_secs"]
    # Each blip that catches a renewal delays that renewal by at most the blip
    # plus one backoff step; count one lost renewal slot per blip.
    exp_ok_lo = int(span / hi_iv) - n_blips - 1
    exp_ok_hi = int(span / lo_iv) + 1
    # Failed fetches: during a blip, a retry comes at least half of
    # max(retry_initial, time since the first failure) after the last one
    # (equal jitter), or 0.9 x retry_max_without_token while requests wait.
    per_blip_max = 0
    tt, ri = 0.0, cfg["retry_initial_s"]
    cap = 0.9 * cfg.get("retry_max_without_token_s", cfg["retry_max_s"])
    while tt <= blip_secs:
        per_blip_max += 1
        tt += max(min(max(ri, tt) / 2, cap), ri / 2)
    exp_err_hi = n_blips * per_blip_max
    ep_ok = sum(1 for t, _, _ in issued if t0 <= t <= t1)
    ep_fail = sum(1 for t in fetch_fail if t0 <= t <= t1)
    tok_ok = exp_ok_lo <= f_ok <= exp_ok_hi and f_err <= exp_err_hi
    say(f"token fetches over {span:.0f} s: success {f_ok:.0f} (expected {exp_ok_lo}-{exp_ok_hi}: one per "
        f"{lo_iv:g}-{hi_iv:g} s, less up to one per blip), error {f_err:.0f} (expected 0-{exp_err_hi}: "
        f"{n_blips} blips of {blip_secs:g} s, at most {per_blip_max} each) -> {'ok' if tok_ok else 'OFF'}; "
        f"the endpoint itself counted {ep_ok} issued, {ep_fail} refused")
    if f_ok > 0:
        say(f"  mean renewal interval {span / f_ok:.2f} s")
    if not tok_ok:
        failures.append(f"token fetches success {f_ok:.0f} / error {f_err:.0f} outside the expected range")
    coal = metric(m1, "token_injector_token_requests_coalesced_total") - \
        metric(m0, "token_injector_token_requests_coalesced_total")
    retries401 = metric(m1, "token_injector_upstream_unauthorized_retries_total") - \
        metric(m0, "token_injector_upstream_unauthorized_retries_total")
    up0 = metric_by(m0, "token_injector_upstream_errors_total", ("route", "kind"))
    up1 = metric_by(m1, "token_injector_upstream_errors_total", ("route", "kind"))
    uperr = {f"{k[0]}/{k[1]}": v - up0.get(k, 0) for k, v in up1.items() if v - up0.get(k, 0)}
    say(f"requests that waited for a fetch (coalesced) {coal:.0f}; upstream 401 retries {retries401:.0f}; "
        f"upstream errors {uperr or 0}")
    codes0 = metric_by(m0, "token_injector_requests_total", ("route", "code"))
    codes1 = metric_by(m1, "token_injector_requests_total", ("route", "code"))
    codes = {f"{k[0]} {k[1]}": int(v - codes0.get(k, 0)) for k, v in sorted(codes1.items()) if v - codes0.get(k, 0)}
    say(f"proxy's requests_total over the run: {codes}")

    # -- reloads
    evs = [json.loads(l) for l in open(os.path.join(d, "events.jsonl"))]
    rel = [e for e in evs if e["event"] == "reload"]
    r_ok = metric(m1, "token_injector_config_reloads_total", result="success") - \
        metric(m0, "token_injector_config_reloads_total", result="success")
    r_err = metric(m1, "token_injector_config_reloads_total", result="error") - \
        metric(m0, "token_injector_config_reloads_total", result="error")
    bad_rel = [e for e in rel if e["success_delta"] < 1 or e["error_delta"] > 0 or not e["route_ok"]]
    say(f"reloads: {len(rel)} done ({sum(1 for e in rel if e['method'].startswith('file'))} by file, "
        f"{sum(1 for e in rel if e['method'].startswith('SIGHUP'))} by SIGHUP); reloads_total success "
        f"+{r_ok:.0f}, error +{r_err:.0f}; {len(bad_rel)} not applied as expected")
    for e in bad_rel:
        say(f"  reload {e['n']} {e['method']}: {e}")
    if bad_rel or r_err or r_ok < len(rel):
        failures.append(f"reloads: {len(bad_rel)} not as expected, {r_err:.0f} errors, "
                        f"{r_ok:.0f} successes for {len(rel)} reloads")
    if any(e["event"] == "blip_failed" for e in evs):
        failures.append("a blip could not be started")

    say()
    say("VERDICT: " + ("PASS" if not failures else "FAIL"))
    for f in failures:
        say(f"  - {f}")
    text = "\n".join(lines)
    print(text)
    open(os.path.join(d, "verdict.txt"), "w").write(text + "\n")
    json.dump({
        "pass": not failures, "failures": failures, "requests": total, "ok_2xx": ok, "non_2xx": n_non2xx,
        "socket_errors": sock, "non_2xx_classes": [
            {"class": c, "status": s, "reason": w, "count": v} for (c, s, w), v in sorted(classes.items())],
        "rss_kib": {"first_minute_max": rss_first, "last_minute_max": rss_last},
        "fds": {"first_minute_max": fd_first, "last_minute_max": fd_last},
        "token_fetches": {"success": f_ok, "error": f_err, "expected_success": [exp_ok_lo, exp_ok_hi],
                          "expected_error_max": exp_err_hi, "span_s": span, "blips": n_blips},
        "reloads": {"done": len(rel), "success": r_ok, "error": r_err, "bad": len(bad_rel)},
        "upstream_sample": {"n": sample_n, "unknown": bad_unknown, "expired": bad_expired},
        "wrk": wrk, "proxy_codes": codes,
    }, open(os.path.join(d, "verdict.json"), "w"), indent=1)
    return 0 if not failures else 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("drive")
    for k in ("admin-port", "pid", "token-port", "extra-port", "proxy-port"):
        p.add_argument("--" + k, type=int, required=True)
    for k in ("duration", "sample-every", "blip-every", "blip-secs", "blip-first", "reload-every"):
        p.add_argument("--" + k, type=float, required=True)
    for k in ("out", "ca", "config", "config-base", "config-extra"):
        p.add_argument("--" + k, required=True)
    v = sub.add_parser("verdict")
    v.add_argument("dir")
    a = ap.parse_args()
    if a.cmd == "drive":
        drive(a)
    else:
        sys.exit(verdict(a))


if __name__ == "__main__":
    main()
