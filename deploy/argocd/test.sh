#!/usr/bin/env bash
# Runs health.lua against every testdata/*.yaml and checks the result.
#
# Each testdata file is one Campaign or Channel as Argo CD would see it, with its
# expectation in header comments:
#   # expect: <Healthy|Progressing|Degraded|Suspended>
#   # expect-message: <exact hs.message>        (optional)
#
# python3 (with PyYAML) turns the YAML into a Lua table literal; a standalone Lua
# (lua5.4, lua5.3, lua5.1 or lua; `apt-get install lua5.4`) then runs health.lua the way
# Argo CD does: `obj` set, only the base and table libraries reachable (Argo CD opens
# no string or math library for configured scripts), and the returned table read back.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

lua=""
for candidate in lua5.4 lua5.3 lua5.1 lua; do
  if command -v "$candidate" >/dev/null 2>&1; then lua="$candidate"; break; fi
done
[ -n "$lua" ] || { echo "test.sh: no Lua interpreter found (apt-get install lua5.4)" >&2; exit 1; }
python3 -c 'import yaml' 2>/dev/null || { echo "test.sh: python3 needs PyYAML (pip install pyyaml)" >&2; exit 1; }

# Libraries Argo CD does not open for configured scripts (comments aside).
if grep -v '^ *--' health.lua | grep -nE '(^|[^.[:alnum:]_])(string|math|os|io|utf8)\.|:(sub|find|match|gsub|format|len|lower|upper|rep)\('; then
  echo "test.sh: health.lua uses a library Argo CD does not load for custom health checks" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# YAML -> `return { ... }` (a Lua chunk evaluating to the object).
to_lua() {
  python3 - "$1" <<'PY'
import sys, yaml

def lua(v, indent=""):
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        out = ['"']
        for ch in v:
            o = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif ch == "\n":
                out.append("\\n")
            elif o < 32 or o > 126:
                out.append("".join("\\%d" % b for b in ch.encode("utf-8")))
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(v, list):
        return "{" + ", ".join(lua(x, indent) for x in v) + "}"
    if isinstance(v, dict):
        # null values are absent keys, as in Argo CD's decoding.
        items = ["[%s] = %s" % (lua(str(k)), lua(x, indent)) for k, x in v.items() if x is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(type(v))

doc = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
# Timestamps stay strings, as in the JSON Argo CD decodes.
print("return " + lua(doc))
PY
}

cat >"$tmp/run.lua" <<'LUA'
-- usage: lua run.lua health.lua object.lua
local script_path, object_path = arg[1], arg[2]
local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a") or f:read("*a")
  f:close()
  return s
end
local obj = assert(load(read(object_path), "=object", "t", {}))()
-- Argo CD's sandbox for configured health scripts: base functions and `table` only.
local env = {
  obj = obj, table = table, ipairs = ipairs, pairs = pairs, next = next, type = type,
  tostring = tostring, tonumber = tonumber, select = select, error = error,
  assert = assert, pcall = pcall, print = print, unpack = table.unpack or unpack,
}
local chunk = assert(load(read(script_path), "=health.lua", "t", env))
local ok, hs = pcall(chunk)
if not ok then
  io.stdout:write("ERROR\t" .. tostring(hs) .. "\n")
  os.exit(0)
end
if type(hs) ~= "table" then
  io.stdout:write("ERROR\thealth.lua returned " .. type(hs) .. ", not a table\n")
  os.exit(0)
end
io.stdout:write(tostring(hs.status) .. "\t" .. tostring(hs.message) .. "\n")
LUA

pass=0
fail=0
for f in testdata/*.yaml; do
  name="$(basename "$f" .yaml)"
  want_status="$(sed -n 's/^# expect: *//p' "$f" | head -n1)"
  want_message="$(sed -n 's/^# expect-message: *//p' "$f" | head -n1)"
  if [ -z "$want_status" ]; then
    echo "FAIL $name: no '# expect:' line"; fail=$((fail + 1)); continue
  fi
  to_lua "$f" >"$tmp/$name.lua"
  out="$("$lua" "$tmp/run.lua" health.lua "$tmp/$name.lua")"
  got_status="${out%%$'\t'*}"
  got_message="${out#*$'\t'}"
  if [ "$got_status" != "$want_status" ]; then
    echo "FAIL $name: status $got_status, want $want_status ($got_message)"; fail=$((fail + 1))
  elif [ -n "$want_message" ] && [ "$got_message" != "$want_message" ]; then
    echo "FAIL $name: message \"$got_message\", want \"$want_message\""; fail=$((fail + 1))
  else
    printf 'ok   %-24s %-12s %s\n' "$name" "$got_status" "$got_message"; pass=$((pass + 1))
  fi
done
echo "$pass passed, $fail failed ($lua)"
[ "$fail" -eq 0 ]
