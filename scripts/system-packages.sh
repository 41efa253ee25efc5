#!/usr/bin/env bash
# The Debian packages the tests need. As root, the missing ones are installed with apt-get (the
# package lists are refreshed first only when one of them is not found); otherwise the missing ones
# are listed and the script exits 0, so the tests that need them say why they are skipped.
set -euo pipefail

PACKAGES=(
  chromium          # the browser the web console's tests drive (tests/web/test_browser.py)
  chromium-driver   # its WebDriver (chromedriver), for Selenium
  dcmtk             # storescu/storescp: real DICOM peers
  dicom3tools       # dciodvfy: validates the DICOM objects meddaemon writes
  orthanc           # a real PACS on loopback
  orthanc-dicomweb  # its DICOMweb plugin (STOW-RS)
  poppler-utils     # pdftoppm/pdftotext: PDFs rendered and read back
)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-packages: missing ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
for package in "${missing[@]}"; do
  if ! apt-cache show "$package" >/dev/null 2>&1; then
    apt-get update -q
    break
  fi
done
apt-get install -y -q "${missing[@]}"
