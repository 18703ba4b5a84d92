-- wrk script for bench/run.sh.
--
-- Environment:
--   BENCH_PATH      request path, e.g. /1k (default /1k)
--   BENCH_ABSOLUTE  if set (a host name such as api.bench), the request line is
--                   absolute-form, as an HTTP_PROXY client sends it:
--                     GET http://api.bench/1k HTTP/1.1
--                     Host: api.bench
--   BENCH_AUTH      if set, sent as the Authorization header (direct baseline only)
--
-- done() prints one machine-readable line, prefixed "BENCHJSON ", that
-- run.sh parses; latencies are in microseconds.

local path = os.getenv("BENCH_PATH") or "/1k"
local absolute = os.getenv("BENCH_ABSOLUTE")
if absolute ~= nil and absolute ~= "" then
   wrk.path = "http://" .. absolute .. path
   wrk.headers["Host"] = absolute
else
   wrk.path = path
end

local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
   wrk.headers["Authorization"] = auth
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
      '"status_errors":%d,"timeouts":%d,' ..
      '"lat_mean_us":%.1f,"lat_max_us":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
