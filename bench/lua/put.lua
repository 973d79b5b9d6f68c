-- PUT unique blocks: body = <base (size-16 bytes)> .. <16 hex digits of a counter>; the path is the block's md5,
-- precomputed by bench/http_bench.py into $KS_BENCH_NAMES (one line per counter value). Each wrk thread takes
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
  token = os.getenv("KS_BENCH_TOKEN")
  names = {}
  for line in io.lines(os.getenv("KS_BENCH_NAMES")) do names[#names + 1] = line end
  local f = io.open(os.getenv("KS_BENCH_BASE"), "rb")
  base = f:read(size - 16)
  f:close()
  wrapped = 0
  n = id
  headers = {}
  if token ~= nil and token ~= "" then headers["Authorization"] = "Bearer " .. token end
end

function request()
  local i = n % #names
  if n >= #names then wrapped = wrapped + 1 end
  n = n + nthreads
  local body = base .. string.format("%016x", i)
  return wrk.format("PUT", "/" .. names[i + 1], headers, body)
end

function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do w = w + (t:get("wrapped") or 0) end
  io.write(string.format("wrapped=%d\n", w))
end
