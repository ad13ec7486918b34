#!/usr/bin/env bash
# Installs the external tools the tests talk to, when they are missing and we may install them:
# DCMTK (storescu, echoscu), dicom3tools (dciodvfy), Orthanc (the PACS) with its DICOMweb plugin
# (the DICOMweb tests' peer), Chromium (UI tests) and PostgreSQL (the store's second back end; the
# tests start their own throwaway server), a CJK font, so that the Chinese interface is readable
# in the UI tests' screenshots, and Node.js with npm (tests/viewers runs OHIF's and Cornerstone3D's
# loaders; it needs Node >= 20.19), and RabbitMQ (the broker of pipeline.queue: celery; the tests
# start their own).
# Not root: prints what is missing; the tests then skip (or fail with CI=true) with the reason.
set -euo pipefail

declare -A tools=(
  [/usr/bin/storescu]=dcmtk
  [/usr/bin/dciodvfy]=dicom3tools
  [/usr/sbin/Orthanc]=orthanc
  [/usr/share/orthanc/plugins/libOrthancDicomWeb.so]=orthanc-dicomweb
  [/usr/bin/chromium]=chromium
  [/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc]=fonts-wqy-zenhei
  [/usr/bin/node]=nodejs
  [/usr/bin/npm]=npm
  [/usr/lib/rabbitmq/bin/rabbitmq-server]=rabbitmq-server
)
missing=()
for path in "${!tools[@]}"; do
  [ -e "$path" ] || missing+=("${tools[$path]}")
done
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
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
# Debian starts Orthanc and PostgreSQL as services on install; the tests run their own.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop orthanc postgresql rabbitmq-server 2>/dev/null || true
fi
