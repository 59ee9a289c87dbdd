-- wrk script: POST a run body (or GET, when BODY is ""); with a prefix argument, a fresh
-- Idempotency-Key per request.
-- wrk -s bench/post.lua URL -- PATH BODY [AUTH_KEY] [KEY_PREFIX]
local counter = 0
local prefix = nil

function init(args)
  wrk.path = args[1]
  if args[2] == "" then
    wrk.method = "GET"
  else
    wrk.method = "POST"
    wrk.body = args[2]
    wrk.headers["Content-Type"] = "application/json"
  end
  if args[3] and args[3] ~= "" then wrk.headers["Authorization"] = "Bearer " .. args[3] end
  prefix = args[4]
end

function request()
  counter = counter + 1
  if prefix then
    wrk.headers["Idempotency-Key"] = prefix .. "-" .. counter
  end
  return wrk.format()
end
