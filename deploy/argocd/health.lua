-- Argo CD health check for Disparo's custom resources (disparo.io Campaign and Channel).
--
-- Argo CD runs this with the live object as the global `obj` and reads back
-- `hs.status` (Healthy, Progressing, Degraded, Suspended) and `hs.message`. The same
-- script serves both kinds; register it under resource.customizations.health for
-- disparo.io_Campaign and disparo.io_Channel (see README.md).
--
-- Campaign, by status.phase and the Ready/Stalled conditions:
--   Completed                              -> Healthy
--   Failed                                 -> Degraded (the Ready condition's message)
--   Cancelled                              -> Suspended: a person stopped it on purpose.
--                                             Degraded would keep the Application red
--                                             forever for a deliberate action; Healthy
--                                             would claim the messages went out.
--   Stalled=True (any non-final phase)     -> Degraded (the Stalled condition's message):
--                                             blocked until a person acts
--   Paused, Draft                          -> Suspended
--   Scheduled, Running, RateLimited, none  -> Progressing (RateLimited resumes by itself)
--   status older than metadata.generation  -> Progressing (the controller has not
--                                             looked at the latest spec yet)
--
-- Channel: Ready=True -> Healthy; Ready=False -> Degraded (with its message);
-- no Ready condition yet, or a stale one -> Progressing.
--
-- Argo CD runs configured scripts with only Lua's base and table libraries (no string,
-- no math, unless useOpenLibs is set), in gopher-lua (Lua 5.1): so no string methods,
-- no string.format, no math here. gopher-lua prints integral numbers without ".0".

local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function int(n)
  if type(n) ~= "number" then
    return "0"
  end
  return tostring(n)
end

-- True when .status describes an older spec than the one in metadata.
local function stale(o)
  local gen = o.metadata and o.metadata.generation
  local seen = o.status and o.status.observedGeneration
  return type(gen) == "number" and type(seen) == "number" and seen < gen
end

local function withMessage(prefix, c)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return prefix .. ": " .. c.message
  end
  return prefix
end

-- "42% (420/1000 sent, 12 failed)" when the counts are known.
local function progress(status)
  local parts = {}
  if status.progress ~= nil and status.progress.percentage ~= nil and status.progress.percentage ~= "" then
    table.insert(parts, status.progress.percentage)
  end
  local m = status.messages
  if m ~= nil and m.total ~= nil then
    table.insert(parts, "(" .. int(m.sent) .. "/" .. int(m.total) .. " sent, " .. int(m.failed) .. " failed)")
  end
  return table.concat(parts, " ")
end

local function campaignHealth(o)
  local hs = {}
  local status = o.status
  if status == nil or status.phase == nil then
    hs.status = "Progressing"
    hs.message = "Waiting for the controller to pick up the campaign"
    return hs
  end
  local phase = status.phase
  local summary = progress(status)
  local function describe(prefix)
    if summary ~= "" then
      return prefix .. " " .. summary
    end
    return prefix
  end

  -- Final phases first: they never change again.
  if phase == "Completed" then
    hs.status = "Healthy"
    hs.message = describe("Completed")
    return hs
  end
  if phase == "Failed" then
    hs.status = "Degraded"
    local ready = condition(status, "Ready")
    hs.message = withMessage("Failed", ready)
    return hs
  end
  if phase == "Cancelled" then
    hs.status = "Suspended"
    hs.message = describe("Cancelled")
    return hs
  end

  if stale(o) then
    hs.status = "Progressing"
    hs.message = "Waiting for the controller to observe generation " .. int(o.metadata.generation)
    return hs
  end

  local stalled = condition(status, "Stalled")
  if stalled ~= nil and stalled.status == "True" then
    hs.status = "Degraded"
    hs.message = withMessage("Stalled", stalled)
    return hs
  end

  if phase == "Paused" or phase == "Draft" then
    hs.status = "Suspended"
    local reconciling = condition(status, "Reconciling")
    if reconciling ~= nil and reconciling.message ~= nil and reconciling.message ~= "" then
      hs.message = phase .. ": " .. reconciling.message
    else
      hs.message = describe(phase)
    end
    return hs
  end

  hs.status = "Progressing"
  local reconciling = condition(status, "Reconciling")
  if phase == "RateLimited" and status.rateLimit ~= nil and status.rateLimit.resumeAt ~= nil then
    hs.message = describe("RateLimited") .. "; resumes at " .. status.rateLimit.resumeAt
  elseif summary == "" and reconciling ~= nil and reconciling.message ~= nil and reconciling.message ~= "" then
    hs.message = phase .. ": " .. reconciling.message
  else
    hs.message = describe(phase)
  end
  return hs
end

local function channelHealth(o)
  local hs = {}
  local ready = condition(o.status, "Ready")
  if ready == nil or stale(o) then
    hs.status = "Progressing"
    hs.message = "Waiting for the controller to check the channel"
    return hs
  end
  if ready.status == "True" then
    hs.status = "Healthy"
    hs.message = withMessage("Ready", ready)
  elseif ready.status == "False" then
    hs.status = "Degraded"
    hs.message = withMessage("Not ready", ready)
  else
    hs.status = "Progressing"
    hs.message = withMessage("Checking", ready)
  end
  return hs
end

if obj.kind == "Channel" then
  return channelHealth(obj)
end
return campaignHealth(obj)
