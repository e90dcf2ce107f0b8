-- Argo CD health of a Fleetwarden UpdateRollout.
local hs = { status = "Progressing", message = "Waiting for the operator to start this rollout" }
local function condition(status, type_)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then return c end
  end
  return nil
end
local s = obj.status
if s == nil or s.phase == nil then return hs end
local waves = ""
if s.waveCount ~= nil and s.waveCount > 0 then
  waves = string.format("wave %d/%d", s.currentWave or 0, s.waveCount)
end
local totals = ""
if s.totals ~= nil then
  totals = string.format("%d/%d succeeded, %d failed", s.totals.succeeded or 0,
    s.totals.eligible or 0, s.totals.failed or 0)
end
local function join(a, b)
  if a == "" then return b end
  if b == "" then return a end
  return a .. ", " .. b
end
if s.phase == "Succeeded" then
  return { status = "Healthy", message = join("Succeeded", totals) }
end
if s.phase == "Failed" or s.phase == "RolledBack" then
  local degraded = condition(s, "Degraded")
  local why = s.phase
  if degraded ~= nil and degraded.message ~= nil then why = s.phase .. ": " .. degraded.message end
  return { status = "Degraded", message = join(why, totals) }
end
if s.phase == "Paused" then
  return { status = "Suspended", message = join("Paused", waves) }
end
-- Waiting for a person (approval), another rollout or a maintenance window: suspended. Soaking
-- is part of progress.
local waiting = condition(s, "Waiting")
if waiting ~= nil and waiting.status == "True" and waiting.reason ~= "Soaking" then
  return { status = "Suspended", message = join(waiting.reason .. ": " .. (waiting.message or ""), waves) }
end
hs.message = join(join(s.phase, waves), totals)
return hs
