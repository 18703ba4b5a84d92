-- wrk script for bench/soak.sh: a mix of requests at a moderate rate.
--
-- Environment:
--   SOAK_ABSOLUTE  if set (a host name), absolute-form requests as an HTTP_PROXY client sends them
--   SOAK_DELAY_MS  pause of each connection between its requests [5]
--   SOAK_ERRLOG    file prefix: each thread appends one line per non-2xx response:
--                  "<unix time, µs resolution> <status> <x-token-injector-error or ->"
-- Mix of 10: 7 x GET /1k, 1 x GET /64k, 2 x POST /echo with a 1 KiB body.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_usec; } soak_timeval;
int gettimeofday(soak_timeval *tv, void *tz);
]]
local tv = ffi.new("soak_timeval")
local function now()
   ffi.C.gettimeofday(tv, nil)
   return tonumber(tv.tv_sec) + tonumber(tv.tv_usec) / 1e6
end

local absolute = os.getenv("SOAK_ABSOLUTE")
local delay_ms = tonumber(os.getenv("SOAK_DELAY_MS") or "5")
local prefix = ""
local headers = {}
if absolute ~= nil and absolute ~= "" then
   prefix = "http://" .. absolute
   headers["Host"] = absolute
end
local body = string.rep("x", 1024)
local reqs = {}
for i = 1, 7 do reqs[#reqs + 1] = wrk.format("GET", prefix .. "/1k", headers) end
reqs[#reqs + 1] = wrk.format("GET", prefix .. "/64k", headers)
local post_headers = { ["Content-Type"] = "text/plain" }
for k, v in pairs(headers) do post_headers[k] = v end
for i = 1, 2 do reqs[#reqs + 1] = wrk.format("POST", prefix .. "/echo", post_headers, body) end

local counter = 0
local threads = {}
local nthreads = 0

function setup(thread)
   nthreads = nthreads + 1
   thread:set("tid", nthreads)
   table.insert(threads, thread)
end

local errlog = nil
ok2xx = 0
non2xx = 0

function init(args)
   local p = os.getenv("SOAK_ERRLOG")
   if p ~= nil and p ~= "" then errlog = io.open(p .. "." .. tostring(tid), "a") end
end

function request()
   counter = counter + 1
   return reqs[(counter % #reqs) + 1]
end

function delay()
   return delay_ms
end

function response(status, hdrs, b)
   if status >= 200 and status < 300 then
      ok2xx = ok2xx + 1
   else
      non2xx = non2xx + 1
      if errlog then
         errlog:write(string.format("%.6f %d %s\n", now(), status,
            hdrs["x-token-injector-error"] or hdrs["X-Token-Injector-Error"] or "-"))
         errlog:flush()
      end
   end
end

function done(summary, latency, requests)
   local ok, bad = 0, 0
   for _, t in ipairs(threads) do
      ok = ok + (t:get("ok2xx") or 0)
      bad = bad + (t:get("non2xx") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'SOAKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"ok_2xx":%d,"non_2xx":%d,' ..
      '"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
      '"status_errors":%d,"timeouts":%d,' ..
      '"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, ok, bad,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
