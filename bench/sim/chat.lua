-- wrk script: one small non-streaming chat completion per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"internlm/internlm2_5-7b-chat",' ..
           '"messages":[{"role":"user","content":"Hello, how are you?"}],' ..
           '"max_tokens":8,"stream":false}'
-- No response() callback: wrk then skips body bookkeeping, and it reports
-- "Non-2xx or 3xx responses" in its summary by itself.
