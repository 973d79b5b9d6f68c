-- GET a fixed set of stored blocks round-robin; paths (signed locators for keepstore, plain names for nginx) come
-- from $KS_BENCH_NAMES, one per line.
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  nthreads = tonumber(os.getenv("KS_BENCH_THREADS"))
  token = os.getenv("KS_BENCH_TOKEN")
  paths = {}
  for line in io.lines(os.getenv("KS_BENCH_NAMES")) do paths[#paths + 1] = line end
  n = id
  headers = {}
  if token ~= nil and token ~= "" then headers["Authorization"] = "Bearer " .. token end
end

function request()
  local p = paths[(n % #paths) + 1]
  n = n + nthreads
  return wrk.format("GET", "/" .. p, headers)
end
