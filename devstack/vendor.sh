#!/usr/bin/env bash
# Refresh the dashboard's vendored chart library (uPlot) from the npm registry, pinned.
# Usage: devstack/vendor.sh [VERSION]   (default: the version in connectors/dashboard/static/vendor/VERSIONS)
# Needs npm. Nothing is loaded from a CDN at runtime: the files below are served by the dashboard itself.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="$here/connectors/dashboard/static/vendor"
version="${1:-$(sed -n 's/^uplot=//p' "$dest/VERSIONS")}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$version" >/dev/null && tar xzf "uplot-$version.tgz")
cp "$tmp/package/dist/uPlot.iife.min.js" "$dest/uPlot.iife.min.js"
cp "$tmp/package/dist/uPlot.min.css" "$dest/uPlot.min.css"
cp "$tmp/package/LICENSE" "$dest/uPlot.LICENSE"
printf 'uplot=%s\n' "$version" >"$dest/VERSIONS"
(cd "$dest" && sha256sum uPlot.iife.min.js uPlot.min.css uPlot.LICENSE >SHA256SUMS)
echo "vendored uplot $version into $dest"
