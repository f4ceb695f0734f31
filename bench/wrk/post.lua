-- wrk script: POST one small chat completion per request; prints a JSON summary.
-- WRK_STREAM=1 asks for SSE ("stream": true); WRK_MAX_TOKENS sets max_tokens.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local stream = os.getenv("WRK_STREAM") == "1"
local max_tokens = tonumber(os.getenv("WRK_MAX_TOKENS") or "16")
wrk.body = '{"model":"internlm/internlm2_5-7b-chat",' ..
           '"messages":[{"role":"user","content":"Hello, how are you?"}],' ..
           '"max_tokens":' .. max_tokens .. ',"stream":' .. tostring(stream) .. '}'

-- WRK_SESSIONS=N: each request carries one of N session ids (x-session-id, the
-- affinity key of prefix_affinity), drawn at random.
local sessions = tonumber(os.getenv("WRK_SESSIONS") or "0")
if sessions > 0 then
  request = function()
    local headers = {["Content-Type"] = "application/json",
                     ["x-session-id"] = "s" .. math.random(sessions)}
    return wrk.format(nil, nil, headers, nil)
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50":%d,"p90":%d,"p99":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
