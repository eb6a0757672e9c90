#!/usr/bin/env bash
# Install MRAnnotator into .venv (Python 3.11) with the system tools its tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # dicom3tools: dciodvfy validates the DICOM series and SEGs the tests write
  # orthanc + orthanc-dicomweb: the PACS the PACS tests and README use; chromium: the OHIF browser test
  missing_pkgs=""
  for pkg in dicom3tools orthanc orthanc-dicomweb chromium; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing_pkgs="$missing_pkgs $pkg"
  done
  # npm fetches the OHIF viewer's built dist once, here (scripts/install_ohif.py)
  command -v npm >/dev/null 2>&1 || missing_pkgs="$missing_pkgs npm"
  if [ -n "$missing_pkgs" ]; then
    # the orthanc package may start Debian's system service (port 8042/4242); the project never uses it and
    # runs its own Orthanc (scripts/orthanc.py): `systemctl disable --now orthanc` if it is not wanted
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing_pkgs >/dev/null
  fi
fi
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# Editable installs skip data-files: put the pydicom-3 compatibility hook for MONAI Label in place
# (see src/_mrannotator_pydicom_compat.py; a wheel install ships it by itself).
cp src/mrannotator-pydicom-compat.pth "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
# The current OHIF (npm @ohif/app 3.13.2, its prebuilt dist, integrity pinned) the server serves at /viewer/:
# fetched once here with `npm pack`, never at run time (scripts/install_ohif.py; apps/mrannotator/ohif_viewer/)
if command -v npm >/dev/null 2>&1; then
  .venv/bin/python scripts/install_ohif.py
else
  echo "npm not found: the OHIF viewer at /viewer/ is not installed (apt-get install npm; python scripts/install_ohif.py)" >&2
fi
