#!/usr/bin/env python3
"""Aggregates the runs of bench/run.sh.

    report.py RESULTS_DIR     prints the tables; writes runs.csv, summary.csv, results.json
    report.py --line JSON     one progress line for one run (run.sh calls it after each run)

Each line of RESULTS_DIR/runs.jsonl is one measured run (see run.sh `measure`).
Medians are over rounds; (min–max) is the spread over rounds. Ratios are
token-injector ÷ peer of the medians, with the spread of the per-round ratios
(runs of the same round are minutes apart at most). In the dpop mode they are
each DPoP subject ÷ the bearer subject, and the callgrind and signature
figures (dpop-callgrind.jsonl, callgrind-*.txt, dpop-sign.jsonl) are added.
"""

import csv
import json
import os
import re
import statistics
import sys

TI = "token-injector"
PEERS = ["nginx", "haproxy", "direct"]


def derive(r):
    """Flat record with the figures of one run."""
    w = r["wrk"]
    secs = w["duration_us"] / 1e6
    req = w["requests"]
    cpu_s = r["cpu_ticks"] / r["clk_tck"]
    has_proc = r["subject"] != "direct"
    return {
        "mode": r["mode"],
        "round": r["round"],
        "shape": r["shape"],
        "body": r["body"],
        "conns": r["conns"],
        "subject": r["subject"],
        "label": r["label"],
        "requests": req,
        "seconds": round(secs, 3),
        "rps": req / secs if secs else 0.0,
        "p50_ms": w["p50_us"] / 1000,
        "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "p999_ms": w["p999_us"] / 1000,
        "cpu_s": cpu_s if has_proc else None,
        "us_per_req": cpu_s * 1e6 / req if has_proc and req else None,
        "peak_rss_mib": r["peak_rss_kib"] / 1024 if r["peak_rss_kib"] is not None else None,
        "rss_after_mib": r["rss_after_kib"] / 1024 if r["rss_after_kib"] is not None else None,
        "idle_rss_mib": r["idle_rss_kib"] / 1024 if r["idle_rss_kib"] is not None else None,
        "hwm_reset": r["hwm_reset"],
        "threads_idle": r["threads_idle"],
        "threads_after": r["threads_after"],
        "non2xx": w["status_errors"],
        "sock_errors": w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"],
        "new_upstream_conns": r["new_upstream_conns"],
        "warmup_new_upstream_conns": r["warmup_new_upstream_conns"],
        "token_requests": r["token_requests"],
        # the subject's established connections to the upstream before the
        # warm-up and after the run (its pool size)
        "pool_before": r.get("pool_before"),
        "pool_after": r.get("pool_after"),
        # dpop mode: proofs the subject signed during the run (its counter)
        "dpop_proofs": r.get("dpop_proofs"),
        # "TLSv1.3/TLS_AES_256_GCM_SHA384=12 ..." of the upstream connections
        # opened during warm-up and run.
        "upstream_tls": " ".join(f"{k}={v}" for k, v in sorted(r.get("upstream_tls", {}).items())),
    }


def fmt_num(v, digits=None):
    if v is None:
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def spread(vals, digits=None):
    """'median (min–max)' of the non-None values."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt_num(med, digits)
    return f"{fmt_num(med, digits)} ({fmt_num(min(vals), digits)}–{fmt_num(max(vals), digits)})"


def stats(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def group(runs):
    cells = {}
    for r in runs:
        key = (r["mode"], r["shape"], r["body"], r["conns"], r["label"])
        cells.setdefault(key, []).append(r)
    return cells


def summarise(runs):
    out = []
    for (mode, shape, body, conns, label), rs in group(runs).items():
        s = {
            "mode": mode, "shape": shape, "body": body, "conns": conns,
            "label": label, "subject": rs[0]["subject"], "rounds": len(rs),
        }
        for f in ("rps", "p50_ms", "p99_ms", "us_per_req", "peak_rss_mib"):
            st = stats([r[f] for r in rs])
            for k, v in st.items():
                s[f"{f}_{k}"] = v
        s["idle_rss_mib"] = rs[0]["idle_rss_mib"]
        s["threads_idle"] = rs[0]["threads_idle"]
        ta = [r["threads_after"] for r in rs if r["threads_after"] is not None]
        s["threads_max"] = max(ta) if ta else None
        for f in ("non2xx", "sock_errors", "new_upstream_conns", "warmup_new_upstream_conns",
                  "token_requests", "requests"):
            s[f] = sum(r[f] for r in rs)
        out.append(s)
    return out


def ratios(runs, mode="compare", base=TI, peers=PEERS):
    """base (token-injector) ÷ each peer, per (shape, body, conns)."""
    by_cell = {}
    for r in runs:
        if r["mode"] != mode:
            continue
        by_cell.setdefault((r["shape"], r["body"], r["conns"]), {}).setdefault(
            r["subject"], {})[r["round"]] = r
    out = []
    for (shape, body, conns), subj in by_cell.items():
        if base not in subj:
            continue
        for peer in peers:
            if peer not in subj:
                continue
            row = {"shape": shape, "body": body, "conns": conns, "peer": peer}
            for f in ("rps", "p99_ms", "us_per_req"):
                a = [r[f] for r in subj[base].values() if r[f] is not None]
                b = [r[f] for r in subj[peer].values() if r[f] is not None]
                if not a or not b or statistics.median(b) == 0:
                    row[f] = None
                    continue
                per_round = [subj[base][k][f] / subj[peer][k][f]
                             for k in subj[base] if k in subj[peer]
                             and subj[base][k][f] is not None and subj[peer][k][f]]
                row[f] = {
                    "ratio_of_medians": statistics.median(a) / statistics.median(b),
                    "per_round_min": min(per_round) if per_round else None,
                    "per_round_max": max(per_round) if per_round else None,
                }
            out.append(row)
    return out


def fmt_ratio(x):
    if not x:
        return "-"
    s = f"{x['ratio_of_medians']:.2f}"
    if x["per_round_min"] is not None and x["per_round_min"] != x["per_round_max"]:
        s += f" ({x['per_round_min']:.2f}–{x['per_round_max']:.2f})"
    return s


def table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


SUBJECT_ORDER = {TI: 0, "nginx": 1, "haproxy": 2, "direct": 3,
                 "bearer": 0, "dpop-es256": 1, "dpop-eddsa": 2}


def cell_rows(runs, mode):
    rows = []
    cells = group([r for r in runs if r["mode"] == mode])
    def order(k):
        shape, body, conns, label = k[1:]
        return (shape not in ("origin", "h2"), body, conns, SUBJECT_ORDER.get(label, 9), label)
    for key in sorted(cells, key=order):
        rs = cells[key]
        _, shape, body, conns, label = key
        peak = [r["peak_rss_mib"] for r in rs if r["peak_rss_mib"] is not None]
        ta = [r["threads_after"] for r in rs if r["threads_after"] is not None]
        rows.append([
            shape, body, conns, label,
            spread([r["rps"] for r in rs], 0),
            spread([r["p50_ms"] for r in rs], 2),
            spread([r["p99_ms"] for r in rs], 2),
            spread([r["us_per_req"] for r in rs], 1),
            fmt_num(max(peak), 1) if peak else "-",
            fmt_num(rs[0]["idle_rss_mib"], 1) if rs[0]["idle_rss_mib"] is not None else "-",
            f"{rs[0]['threads_idle']}/{max(ta)}" if ta else "-",
            sum(r["non2xx"] for r in rs),
            sum(r["sock_errors"] for r in rs),
            f"{sum(r['new_upstream_conns'] for r in rs)}/{sum(r['warmup_new_upstream_conns'] for r in rs)}",
            pool_range(rs),
            sum(r["token_requests"] for r in rs),
        ])
    return rows


CELL_HEADERS = ["shape", "body", "conns", "subject", "req/s (min–max)", "p50 ms",
                "p99 ms (min–max)", "CPU µs/req (min–max)", "peak RSS MiB",
                "idle RSS MiB", "threads idle/load", "non-2xx", "sock err",
                "new upstream conns run/warm-up", "pool before→after", "token reqs"]


def pool_range(rs):
    """'before→after' of the subject's upstream connections; ranges over rounds."""
    def rng(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        return str(min(vals)) if min(vals) == max(vals) else f"{min(vals)}–{max(vals)}"
    b, a = rng([r["pool_before"] for r in rs]), rng([r["pool_after"] for r in rs])
    return "-" if b == a == "-" else f"{b}→{a}"


def scale_rows(runs, meta):
    """Route/profile counts: cost against routes-1 and memory per route/profile."""
    rs = [r for r in runs if r["mode"] == "routes"]
    if not rs:
        return [], []
    labels = sorted({r["label"] for r in rs},
                    key=lambda l: (int(l.split("-")[1]), l.split("-")[0] != "routes"))

    def med(label, shape, f):
        v = [r[f] for r in rs if r["label"] == label and r["shape"] == shape and r[f] is not None]
        return statistics.median(v) if v else None

    idle = {}
    for label in labels:
        v = [r["idle_rss_mib"] for r in rs if r["label"] == label and r["idle_rss_mib"] is not None]
        idle[label] = v[0] if v else None
    subjects = meta.get("subjects", {})
    rows, mem = [], []
    for label in labels:
        variant, n = label.split("-")
        n = int(n)
        row = [label, n, n if variant == "profiles" else 1,
               fmt_num(idle[label], 1), subjects.get(label, {}).get("ready_s", "-")]
        for shape in ("absolute", "origin"):
            rps = med(label, shape, "rps")
            base = med("routes-1", shape, "rps")
            us = med(label, shape, "us_per_req")
            base_us = med("routes-1", shape, "us_per_req")
            row += [fmt_num(rps, 0),
                    f"{rps / base - 1:+.1%}" if rps and base else "-",
                    fmt_num(us, 1),
                    f"{us / base_us - 1:+.1%}" if us and base_us else "-",
                    fmt_num(med(label, shape, "p99_ms"), 2)]
        peak = [r["peak_rss_mib"] for r in rs if r["label"] == label and r["peak_rss_mib"] is not None]
        row.append(fmt_num(max(peak), 1) if peak else "-")
        rows.append(row)
        if n > 1 and idle.get("routes-1") is not None:
            if variant == "routes" and idle[label] is not None:
                mem.append({"what": "route", "count": n,
                            "kib_each": (idle[label] - idle["routes-1"]) * 1024 / (n - 1)})
            if variant == "profiles" and idle[label] is not None and idle.get(f"routes-{n}") is not None:
                mem.append({"what": "profile", "count": n,
                            "kib_each": (idle[label] - idle[f"routes-{n}"]) * 1024 / (n - 1)})
    return rows, mem


SCALE_HEADERS = ["config", "routes", "profiles", "idle RSS MiB", "ready s",
                 "abs req/s", "vs 1", "abs µs/req", "vs 1", "abs p99 ms",
                 "orig req/s", "vs 1", "orig µs/req", "vs 1", "orig p99 ms", "peak RSS MiB"]


def ratio_rows(rat):
    rows = []
    cells = {}
    for r in rat:
        cells.setdefault((r["shape"], r["body"], r["conns"]), {})[r["peer"]] = r
    for key in sorted(cells, key=lambda k: (k[0] != "origin", k[1], k[2])):
        c = cells[key]
        g = lambda peer, f: fmt_ratio(c[peer][f]) if peer in c else "-"
        rows.append([*key,
                     g("nginx", "rps"), g("haproxy", "rps"), g("direct", "rps"),
                     g("nginx", "us_per_req"), g("haproxy", "us_per_req"),
                     g("nginx", "p99_ms"), g("haproxy", "p99_ms"), g("direct", "p99_ms")])
    return rows


RATIO_HEADERS = ["shape", "body", "conns",
                 "req/s ÷nginx", "req/s ÷haproxy", "req/s ÷direct",
                 "µs/req ÷nginx", "µs/req ÷haproxy",
                 "p99 ÷nginx", "p99 ÷haproxy", "p99 ÷direct"]


# ---------------------------------------------------------------- dpop mode

DPOP_BASE = "bearer"
DPOP_PEERS = ["dpop-es256", "dpop-eddsa"]


def dpop_rows(runs):
    """Each DPoP subject against the bearer one: ratios of medians (per-round
    min–max) and the extra CPU µs per request."""
    rows = []
    by_cell = {}
    for r in runs:
        if r["mode"] == "dpop":
            by_cell.setdefault((r["shape"], r["body"], r["conns"]), {}).setdefault(
                r["subject"], {})[r["round"]] = r
    rat = {(x["shape"], x["body"], x["conns"], x["peer"]): x
           for x in ratios(runs, "dpop", base=DPOP_BASE, peers=DPOP_PEERS)}
    for key in sorted(by_cell, key=lambda k: (k[0] != "origin", k[1], k[2])):
        subj = by_cell[key]
        if DPOP_BASE not in subj:
            continue
        for peer in DPOP_PEERS:
            if peer not in subj:
                continue
            # ratios() divides base by peer; here the peer is the numerator.
            def inv(f):
                x = rat[(*key, peer)][f]
                if not x:
                    return "-"
                lo, hi = x["per_round_min"], x["per_round_max"]
                s = f"{1 / x['ratio_of_medians']:.2f}"
                if lo is not None and lo != hi:
                    s += f" ({1 / hi:.2f}–{1 / lo:.2f})"
                return s
            b = subj[DPOP_BASE]
            d = subj[peer]
            diffs = [d[k]["us_per_req"] - b[k]["us_per_req"] for k in d if k in b]
            rows.append([*key, peer, inv("us_per_req"), spread(diffs, 1), inv("rps"), inv("p99_ms")])
    return rows


DPOP_HEADERS = ["shape", "body", "conns", "subject", "CPU µs/req ÷bearer", "extra CPU µs/req",
                "req/s ÷bearer", "p99 ÷bearer"]


def proofs_per_request(runs, label):
    rs = [r for r in runs if r["mode"] == "dpop" and r["label"] == label]
    p = sum(r["dpop_proofs"] or 0 for r in rs)
    n = sum(r["requests"] for r in rs)
    return f"{p / n:.3f}" if n else "-"


# What each function of a callgrind_annotate listing is, for the sums of
# "where the extra instructions go". First match wins.
CATEGORIES = [
    ("random (getrandom; ECDSA's nonce)", r"getrandom|SystemRandom|NonceRandom|SecureRandom"),
    ("P-256 ECDSA (ring nistz256: scalar mult, field and scalar arithmetic)",
     r"nistz256|p256|ecdsa|suite_b|LIMBS?_|affine_from_jacobian"),
    ("Ed25519 (ring curve25519)", r"25519|^ge_|^fe_|^sc_|^table_select$"),
    ("SHA-2 (ring)", r"sha256|sha512|digest::|BlockContext"),
    ("base64", r"base64"),
    ("proof claims, JSON, UTF-8 checks (dpop::proof, json_string, fmt)",
     r"token_injector::dpop::|json_string|core::fmt|fmt::|from_utf8|write_htu"),
    ("headers (HeaderValue, HeaderMap, h1 encode)", r"header|HeaderValue|HeaderMap|Http1Transaction"),
    ("memcpy / memset", r"mem(cpy|move|set)|memcmp|bcmp"),
    ("malloc / free", r"malloc|free|realloc|tcache"),
    ("TLS record crypto (AES-GCM)", r"aesni|ghash|gcm"),
]


def categorise(name):
    for cat, rx in CATEGORIES:
        if re.search(rx, name, re.I):
            return cat
    return "other"


LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*?)(?:\s+\[[^\]]*\])?\s*$")


def annotate_costs(path):
    """{function: self instructions} from `callgrind_annotate --inclusive=no`."""
    costs = {}
    started = False
    with open(path) as f:
        for line in f:
            if "file:function" in line:
                started = True
                continue
            m = LINE.match(line) if started else None
            if not m or "PROGRAM TOTALS" in line:
                continue
            name = re.sub(r"^(\?\?\?|\S*?\.(?:S|s|c|h|rs|cc|cpp)):", "", m.group(2))
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def dpop_callgrind(d):
    path = os.path.join(d, "dpop-callgrind.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        cg = {j["subject"]: j for j in (json.loads(l) for l in f if l.strip())}
    if not cg:
        return []
    out = ["", "== Instructions per request, user space (callgrind; h2load --h1 -n, origin /1k; "
               "deterministic: compare these, not the wall clock) =="]
    base = cg.get(DPOP_BASE)
    rows = []
    for s, j in sorted(cg.items(), key=lambda kv: SUBJECT_ORDER.get(kv[0], 9)):
        rows.append([s, f"{j['requests']:,}", j["conns"], f"{j['ir_per_request']:,}",
                     f"{j['ir_per_request'] / base['ir_per_request']:.2f}" if base else "-",
                     f"{j['ir_per_request'] - base['ir_per_request']:+,}" if base else "-",
                     f"{j['dpop_proofs'] / j['requests']:.3f}", j["token_requests"], j["new_upstream_conns"]])
    out.append(table(["subject", "requests", "conns", "instructions/req", "÷bearer", "Δ vs bearer",
                      "proofs/req", "token reqs", "new upstream conns"], rows))
    if not base:
        return out
    bpath = os.path.join(d, f"callgrind-{DPOP_BASE}.txt")
    if not os.path.exists(bpath):
        return out
    bc = annotate_costs(bpath)
    for s in DPOP_PEERS:
        p = os.path.join(d, f"callgrind-{s}.txt")
        if s not in cg or not os.path.exists(p):
            continue
        n = cg[s]["requests"]
        pc = annotate_costs(p)
        diff = {k: (pc.get(k, 0) - bc.get(k, 0)) / n for k in set(pc) | set(bc)}
        total = cg[s]["ir_per_request"] - base["ir_per_request"]
        cats = {}
        for k, v in diff.items():
            c = categorise(k)
            cats[c] = cats.get(c, 0) + v
        out += ["", f"-- {s} − bearer, per request: {total:+,} instructions, by kind of function --",
                table(["kind", "Δ instructions/req", "share of Δ"],
                      [[c, f"{v:+,.0f}", f"{v / total:.1%}" if total else "-"]
                       for c, v in sorted(cats.items(), key=lambda kv: -abs(kv[1])) if abs(v) >= 20])]
        top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:25]
        out += ["", f"-- {s} − bearer, the 25 functions that changed most (self instructions per request) --",
                table(["Δ/req", "function"], [[f"{v:+,.0f}", k[:140]] for k, v in top])]
    return out


def dpop_sign(d):
    path = os.path.join(d, "dpop-sign.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    wall, cpu, cg = {}, {}, {}
    for j in lines:
        if j["kind"] == "wall":
            wall.setdefault(j["alg"], []).extend(j["us_per_proof"])
            cpu.setdefault(j["alg"], []).extend(j.get("cpu_us_per_proof", []))
        else:
            cg[j["alg"]] = j
    out = ["", "== One proof (examples/dpop_sign.rs: ProofKey::proof with a generated key, ring; "
               "on the proxy's CPU; median (min–max) over rounds × repetitions; CPU = the thread's "
               "run time from /proc/thread-self/schedstat, user + kernel) =="]
    rows = []
    for alg in ("ES256", "EdDSA"):
        rows.append([alg, spread(cpu.get(alg, []), 1), spread(wall.get(alg, []), 1),
                     f"{cg[alg]['ir_per_proof']:,}" if alg in cg else "-"])
    out.append(table(["alg", "CPU µs per proof", "wall µs per proof",
                      "instructions per proof (callgrind, user space)"], rows))
    for alg in ("ES256", "EdDSA"):
        p = os.path.join(d, f"callgrind-sign-{alg}.txt")
        if alg not in cg or not os.path.exists(p):
            continue
        n = cg[alg]["proofs"]
        costs = annotate_costs(p)
        cats = {}
        for k, v in costs.items():
            c = categorise(k)
            cats[c] = cats.get(c, 0) + v / n
        total = cg[alg]["ir_per_proof"]
        out += ["", f"-- {alg}: one proof, {total:,} instructions, by kind of function (callgrind) --",
                table(["kind", "instructions/proof", "share"],
                      [[c, f"{v:,.0f}", f"{v / total:.1%}"]
                       for c, v in sorted(cats.items(), key=lambda kv: -kv[1]) if v >= 20])]
        top = sorted(costs.items(), key=lambda kv: -kv[1])[:12]
        out += [table(["instr/proof", "function"], [[f"{v / n:,.0f}", k[:140]] for k, v in top])]
    return out



def progress_line(raw):
    r = derive(json.loads(raw))
    print(f"    {r['label']:<15} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
          f"p99 {r['p99_ms']:.2f} ms  "
          f"{fmt_num(r['us_per_req'], 1) if r['us_per_req'] is not None else '-'} µs/req  "
          f"peak {fmt_num(r['peak_rss_mib'], 1)} MiB  threads {r['threads_after'] or '-'}  "
          f"non-2xx {r['non2xx']}  sock err {r['sock_errors']}  "
          f"new upstream conns {r['new_upstream_conns']} (warm-up {r['warmup_new_upstream_conns']})  "
          f"pool {r['pool_before'] if r['pool_before'] is not None else '-'}→"
          f"{r['pool_after'] if r['pool_after'] is not None else '-'}  "
          f"token reqs {r['token_requests']}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--line":
        progress_line(sys.argv[2])
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    with open(os.path.join(d, "runs.jsonl")) as f:
        runs = [derive(json.loads(l)) for l in f if l.strip()]
    meta = {}
    if os.path.exists(os.path.join(d, "meta.json")):
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
    cold = None
    if os.path.exists(os.path.join(d, "cold_burst.json")):
        with open(os.path.join(d, "cold_burst.json")) as f:
            cold = json.load(f)

    summary = summarise(runs)
    rat = ratios(runs)
    rat += ratios(runs, mode="h2")
    scale, mem = scale_rows(runs, meta)

    out = []
    v = meta.get("versions", {})
    out.append(f"token-injector bench, {meta.get('mode', '?')} mode, {meta.get('stamp', '?')} "
               f"(git {meta.get('git', '?')}); {meta.get('rounds')} round(s) of "
               f"{meta.get('duration_s')} s after {meta.get('warmup_s')} s warm-up; "
               f"subject on CPU {meta.get('proxy_cpu')}, wrk + upstream on CPU {meta.get('load_cpu')}; "
               f"busy loops {'on' if meta.get('busy_loops') else 'off'}")
    out.append(f"token-injector {v.get('token_injector')}, nginx {v.get('nginx')}, "
               f"haproxy {v.get('haproxy')}, wrk {v.get('wrk')}; {meta.get('cpu', '')}; "
               f"kernel {meta.get('kernel', '')}; token {meta.get('token_bytes')} bytes")
    out.append("Medians over rounds (min–max). CPU µs/req: utime+stime of the subject's "
               "processes over the run ÷ requests. peak RSS: VmHWM of the serving process "
               "during the run. non-2xx and sock err must be 0.")
    if any(r["mode"] == "compare" for r in runs):
        out += ["", "== Side by side ==", table(CELL_HEADERS, cell_rows(runs, "compare"))]
        out += ["", "== token-injector ÷ peer (ratio of medians; per-round min–max) ==",
                "req/s: higher is better; µs/req and p99: lower is better",
                table(RATIO_HEADERS, ratio_rows(rat))]
    if scale:
        rconns = sorted({r["conns"] for r in runs if r["mode"] == "routes"})
        out += ["", "== Routes and profiles (token-injector, /1k, "
                f"{'/'.join(map(str, rconns))} connections; 'vs 1' = change against 1 route) ==",
                table(SCALE_HEADERS, scale)]
        for m in mem:
            out.append(f"memory per {m['what']} ({m['count']:,} configured): {m['kib_each']:.2f} KiB "
                       "(idle RSS delta ÷ count)")
    if any(r["mode"] == "conns" for r in runs):
        out += ["", "== Connections (origin-form, /1k) ==", table(CELL_HEADERS, cell_rows(runs, "conns"))]
        conn_rat = ratios(runs, mode="conns")
        if conn_rat:
            out += ["", "== token-injector ÷ peer, connections sweep ==",
                    table(RATIO_HEADERS, ratio_rows(conn_rat))]
    if any(r["mode"] == "h2" for r in runs):
        out += ["", "== HTTP/2 and gRPC (h2c in, HTTP/2 over TLS out; h2load; "
                "shape = scenario, conns = concurrent streams over "
                f"{meta.get('h2_clients', '?')} connections) ==",
                table(CELL_HEADERS, cell_rows(runs, "h2"))]
        h2_rat = ratios(runs, mode="h2")
        if h2_rat:
            out += ["", "== token-injector ÷ peer, HTTP/2 and gRPC ==",
                    table(RATIO_HEADERS, ratio_rows(h2_rat))]
    if any(r["mode"] == "dpop" for r in runs):
        rows = cell_rows(runs, "dpop")
        for row in rows:
            row.append(proofs_per_request(runs, row[3]) if row[3] != DPOP_BASE else "-")
        out += ["", "== DPoP against Bearer (token-injector; subjects interleaved each round) ==",
                table(CELL_HEADERS + ["proofs/req"], rows)]
        out += ["", "== DPoP ÷ Bearer (ratio of medians; per-round min–max); extra CPU µs/req = "
                    "median (min–max) of the per-round differences ==",
                "CPU µs/req and p99: lower is better; req/s: higher is better",
                table(DPOP_HEADERS, dpop_rows(runs))]
    out += dpop_callgrind(d)
    out += dpop_sign(d)
    tls = {}
    for r in runs:
        for item in r["upstream_tls"].split():
            tls.setdefault(r["label"], set()).add(item.split("=")[0])
    if tls:
        out.append("")
        out.append("Upstream TLS (new connections seen by the upstream): " + "; ".join(
            f"{label} {', '.join(sorted(v))}" for label, v in sorted(
                tls.items(), key=lambda kv: (SUBJECT_ORDER.get(kv[0], 9), kv[0]))))
    bad = [r for r in runs if r["non2xx"] or r["sock_errors"]]
    out.append("")
    if bad:
        out.append(f"WARNING: {len(bad)} run(s) had non-2xx responses or socket errors: "
                   + ", ".join(f"{r['mode']}/{r['shape']}/{r['body']}/c{r['conns']}/{r['label']}"
                               f"/round{r['round']} ({r['non2xx']} non-2xx, {r['sock_errors']} sock err)"
                               for r in bad))
    else:
        out.append("All runs: 0 non-2xx responses, 0 socket errors.")
    toks = sum(r["token_requests"] for r in runs)
    if runs:
        out.append(f"Token requests during measured runs: {toks}.")
    if cold:
        out.append(f"Cold burst: {cold['ok_200']}/{cold['requests']} requests answered 200 with "
                   f"{cold['token_requests_seen_by_endpoint']} token request(s) at the endpoint "
                   f"(endpoint delay {cold['token_endpoint_delay_s']} s; "
                   f"coalesced {cold['token_requests_coalesced_total']:.0f}).")
    print("\n".join(out))

    fields = list(runs[0].keys()) if runs else []
    with open(os.path.join(d, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(runs)
    if summary:
        with open(os.path.join(d, "summary.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
            w.writeheader()
            w.writerows(summary)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump({"meta": meta, "cold_burst": cold, "summary": summary, "ratios": rat,
                   "memory_per_item": mem, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
