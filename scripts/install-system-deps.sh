#!/usr/bin/env bash
# Installs the external tools the tests talk to, when they are missing and we may install them:
# DCMTK (storescu, echoscu), dicom3tools (dciodvfy), Orthanc (the PACS) and Chromium (UI tests).
# Not root: prints what is missing; the tests then skip (or fail with CI=true) with the reason.
set -euo pipefail

declare -A tools=(
  [/usr/bin/storescu]=dcmtk
  [/usr/bin/dciodvfy]=dicom3tools
  [/usr/sbin/Orthanc]=orthanc
  [/usr/bin/chromium]=chromium
)
missing=()
for path in "${!tools[@]}"; do
  [ -x "$path" ] || missing+=("${tools[$path]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: missing ${missing[*]}; run 'sudo apt-get install ${missing[*]}'" >&2
  exit 0
fi
echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts Orthanc as a service on install; the tests run their own instances.
if command -v systemctl >/dev/null 2>&1; then systemctl stop orthanc 2>/dev/null || true; fi
