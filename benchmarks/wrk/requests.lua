-- wrk script of `make bench`: the request comes from the environment; answers are counted by
-- status and summarised as one JSON line ("BENCH_RESULT {...}") for the harness to parse.
--
--   BENCH_METHOD         GET (default) or POST
--   BENCH_BODY           request body, sent as application/json
--   BENCH_AUTHORIZATION  Authorization header value
--   BENCH_ID_MARK        when set, this text in BENCH_BODY is replaced per request by a unique
--                        id: BENCH_ID_PREFIX-<thread>-<counter> (a new Pub/Sub messageId each)

local body = os.getenv("BENCH_BODY")
local authorization = os.getenv("BENCH_AUTHORIZATION")
local mark = os.getenv("BENCH_ID_MARK")

wrk.method = os.getenv("BENCH_METHOD") or "GET"
if body then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end
if authorization then
  wrk.headers["Authorization"] = authorization
end

local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  counter = 0
end

-- Only defined when ids vary: a script without request() lets wrk build the request once.
if mark then
  local first, last = string.find(body, mark, 1, true)
  local head = string.sub(body, 1, first - 1)
  local tail = string.sub(body, last + 1)
  local prefix = os.getenv("BENCH_ID_PREFIX") or "wrk"
  function request()
    counter = counter + 1
    return wrk.format(nil, nil, nil, head .. prefix .. "-" .. thread_id .. "-" .. counter .. tail)
  end
end

function response(status, headers, response_body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  local non2xx = 0
  for status, n in pairs(counts) do
    table.insert(parts, string.format('"%d": %d', status, n))
    if status < 200 or status > 299 then
      non2xx = non2xx + n
    end
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"non2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"timeouts": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    non2xx, errors.connect, errors.read, errors.write, errors.timeout,
    table.concat(parts, ", ")))
end
