-- Argo CD health of a Fleetwarden Device.
local hs = { status = "Progressing", message = "Waiting for the operator to observe this Device" }
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
local lifecycle = (obj.spec and obj.spec.lifecycle) or "Active"
if lifecycle == "Retired" then
  return { status = "Suspended", message = "Retired: identity revoked" }
end
if lifecycle == "Suspended" then
  return { status = "Suspended", message = "Suspended: the gateway refuses this device" }
end
local degraded = condition(s, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  return { status = "Degraded", message = degraded.reason .. ": " .. (degraded.message or "") }
end
if lifecycle == "Quarantined" then
  return { status = "Degraded", message = "Quarantined: isolated, remediation updates only" }
end
local enrolled = condition(s, "Enrolled")
if enrolled == nil or enrolled.status ~= "True" then
  local why = "not enrolled yet"
  if enrolled ~= nil and enrolled.message ~= nil and enrolled.message ~= "" then why = enrolled.message end
  if enrolled ~= nil and enrolled.reason == "CsrDenied" then
    return { status = "Degraded", message = "CSR denied: " .. why }
  end
  return { status = "Progressing", message = why }
end
local compliant = condition(s, "Compliant")
if compliant ~= nil and compliant.status == "False" then
  return { status = "Degraded", message = "Not compliant: " .. (compliant.message or compliant.reason) }
end
local ready = condition(s, "Ready")
if ready ~= nil and ready.status == "True" then
  return { status = "Healthy", message = ready.message or "Ready" }
end
hs.message = (ready and ready.message) or "Waiting for Ready"
return hs
