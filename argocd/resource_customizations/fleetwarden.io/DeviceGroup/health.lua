-- Argo CD health of a Fleetwarden DeviceGroup (inventory, zone policies, segmentation audit).
local hs = { status = "Progressing", message = "Waiting for the operator to observe this DeviceGroup" }
local function condition(status, type_)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then return c end
  end
  return nil
end
local s = obj.status
if s == nil then return hs end
if s.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and s.observedGeneration < obj.metadata.generation then
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local degraded = condition(s, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  return { status = "Degraded", message = degraded.reason .. ": " .. (degraded.message or "") }
end
local audit = condition(s, "AuditClean")
if audit ~= nil and audit.status == "False" then
  return { status = "Degraded", message = "Segmentation audit: " .. (audit.message or audit.reason) }
end
local ready = condition(s, "Ready")
if ready ~= nil and ready.status == "True" then
  local msg = ready.message or "Ready"
  if s.inventory ~= nil then
    msg = string.format("%d devices, %d enrolled, %d compliant, %d quarantined",
      s.inventory.total or 0, s.inventory.enrolled or 0, s.inventory.compliant or 0,
      s.inventory.quarantined or 0)
  end
  return { status = "Healthy", message = msg }
end
return hs
