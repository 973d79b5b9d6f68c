-- PUT unique blocks: body = <base (size-16 bytes)> .. <16 hex digits of a counter>; the path is the block's md5,
-- precomputed by bench/http_bench.py into $KS_BENCH_NAMES (one line per counter value, from $KS_BENCH_FIRST on:
-- every run gets counter values no other run uses, so nothing needs deleting between runs). Each wrk thread takes
-- every T-th name, so no name is written twice unless the list runs out (counted in "wrapped").
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  nthreads = tonumber(os.getenv("KS_BENCH_THREADS"))
  size = tonumber(os.getenv("KS_BENCH_SIZE"))
  first = tonumber(os.getenv("KS_BENCH_FIRST") or "0")
  token = os.getenv("KS_BENCH_TOKEN")
  names = {}
  for line in io.lines(os.getenv("KS_BENCH_NAMES")) do names[#names + 1] = line end
  local f = io.open(os.getenv("KS_BENCH_BASE"), "rb")
  base = f:read(size - 16)
  f:close()
  wrapped = 0
  n = id
  extra = "Host: " .. wrk.host .. ":" .. wrk.port .. "\r\nContent-Length: " .. size .. "\r\n"
  if token ~= nil and token ~= "" then extra = extra .. "Authorization: Bearer " .. token .. "\r\n" end
end

function request()
  -- One concatenation (one copy of the body) per request: wrk.format would copy the body a second time, which
  -- for 64 MiB blocks makes the load generator, not the server, the bottleneck.
  local i = n % #names
  if n >= #names then wrapped = wrapped + 1 end
  n = n + nthreads
  return "PUT /" .. names[i + 1] .. " HTTP/1.1\r\n" .. extra .. "\r\n" .. base .. string.format("%016x", first + i)
end

function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do w = w + (t:get("wrapped") or 0) end
  io.write(string.format("wrapped=%d\n", w))
end
