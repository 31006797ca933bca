#!/usr/bin/env bash
# Regenerates templates/crds/*.yaml from the repository's crds/*.yaml (the output of
# `disparo crd --out-dir crds`, itself generated from the Rust types).
#
# Why templates and not the chart's crds/ folder: Helm installs files in crds/ once and
# never upgrades them, so schema and CEL changes would silently never reach a cluster.
# As templates they are upgraded with the release; `helm.sh/resource-policy: keep`
# stops `helm uninstall` from deleting them (which would delete every Campaign and
# Channel with them), and `crds.install=false` leaves them to another tool.
#
# Each template is the CRD file unchanged except for:
#   * the wrapper `{{- if .Values.crds.install }}` ... `{{- end }}`,
#   * the annotation `helm.sh/resource-policy: keep` under metadata.annotations,
#   * every `{{` escaped as `{{ "{{" }}` in the template source, because the CRD
#     descriptions quote message variables such as `{{contact.name}}`; the rendered
#     output carries them verbatim.
#
# Usage:
#   charts/disparo/sync-crds.sh           write templates/crds/*.yaml
#   charts/disparo/sync-crds.sh --check   exit 1 if templates/crds/ is out of date; if
#                                         helm is found (HELM or PATH), also render the
#                                         chart and check the output equals crds/ plus
#                                         the annotation
set -euo pipefail

chart_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src_dir="$chart_dir/../../crds"
out_dir="$chart_dir/templates/crds"
mode="${1:-write}"

shopt -s nullglob
sources=("$src_dir"/*.yaml)
if [ ${#sources[@]} -eq 0 ]; then
  echo "sync-crds.sh: no CRDs in $src_dir (generate them with: disparo crd --out-dir crds)" >&2
  exit 1
fi

# Transforms one CRD file (argv[1]) into its template on stdout.
transform() {
  python3 - "$1" <<'PY'
import re, sys

src = open(sys.argv[1], encoding="utf-8").read()
lines = src.splitlines(keepends=True)
annotation = "helm.sh/resource-policy: keep"

# Find the top-level `metadata:` block and its extent.
try:
    start = next(i for i, l in enumerate(lines) if l.rstrip("\n") == "metadata:")
except StopIteration:
    sys.exit(f"{sys.argv[1]}: no top-level 'metadata:' line")
end = start + 1
while end < len(lines) and (lines[end].startswith(" ") or lines[end].strip() == ""):
    end += 1

ann = next((i for i in range(start + 1, end) if lines[i].rstrip("\n") == "  annotations:"), None)
if ann is not None:
    if any(l.strip() == annotation for l in lines[ann + 1:end]):
        pass  # already there
    else:
        lines.insert(ann + 1, f"    {annotation}\n")
elif any(l.startswith("  annotations: {}") for l in lines[start + 1:end]):
    i = next(i for i in range(start + 1, end) if lines[i].startswith("  annotations: {}"))
    lines[i] = f"  annotations:\n    {annotation}\n"
else:
    lines.insert(start + 1, f"  annotations:\n    {annotation}\n")

body = "".join(lines)
body = body.replace("{{", '{{ "{{" }}')  # `}}` outside an action is plain text
if not body.endswith("\n"):
    body += "\n"
sys.stdout.write("{{- if .Values.crds.install }}\n" + body + "{{- end }}\n")
PY
}

case "$mode" in
  write)
    mkdir -p "$out_dir"
    # Drop templates whose CRD no longer exists.
    for t in "$out_dir"/*.yaml; do
      [ -e "$src_dir/$(basename "$t")" ] || rm -f "$t"
    done
    for s in "${sources[@]}"; do
      transform "$s" >"$out_dir/$(basename "$s")"
      echo "wrote templates/crds/$(basename "$s")"
    done
    ;;
  --check)
    status=0
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    for s in "${sources[@]}"; do
      name="$(basename "$s")"
      transform "$s" >"$tmp/$name"
      if ! diff -u "$out_dir/$name" "$tmp/$name"; then
        echo "sync-crds.sh: templates/crds/$name is out of date: run charts/disparo/sync-crds.sh" >&2
        status=1
      fi
    done
    for t in "$out_dir"/*.yaml; do
      if [ ! -e "$src_dir/$(basename "$t")" ]; then
        echo "sync-crds.sh: templates/crds/$(basename "$t") has no source in crds/" >&2
        status=1
      fi
    done
    helm="${HELM:-$(command -v helm || true)}"
    if [ "$status" -eq 0 ] && [ -n "$helm" ]; then
      for s in "${sources[@]}"; do
        name="$(basename "$s")"
        # Rendered output minus helm's document header and the added annotation
        # must equal the source byte for byte.
        "$helm" template disparo "$chart_dir" --show-only "templates/crds/$name" \
          | python3 -c '
import sys
out = sys.stdin.read()
head = "---\n# Source: disparo/templates/crds/'"$name"'\n"
assert out.startswith(head), "unexpected helm output header"
out = out[len(head):]
out = out.replace("  annotations:\n    helm.sh/resource-policy: keep\n", "", 1)
sys.stdout.write(out.rstrip("\n") + "\n")  # helm pads documents with blank lines' >"$tmp/rendered-$name"
        if ! diff -u "$s" "$tmp/rendered-$name"; then
          echo "sync-crds.sh: rendered $name differs from crds/$name" >&2
          status=1
        fi
      done
    fi
    exit "$status"
    ;;
  *)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac
