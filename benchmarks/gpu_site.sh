#!/usr/bin/env bash
# Build .whl/gsite.tar.xz: medfusion's dependencies that the lent GPU machine lacks, for its Python
# (CPython 3.12, x86-64; it has torch, numpy, scipy, scikit-learn, matplotlib, typer, rich, … and no
# package index), at the versions .venv holds. benchmarks/gpu_check.sh unpacks it there.
#
#   bash benchmarks/gpu_site.sh      # then: device run "bash benchmarks/gpu_check.sh", carry [".whl"]
#
# The tarball (≈ 40 MB; SimpleITK is most of it) plus the tracked tree must stay under the 64 MiB a
# device call carries, hence xz rather than the wheels themselves (≈ 68 MB). python-gdcm is left out
# (size); pylibjpeg and its plugins travel as wheels beside the tarball.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PKGS="monai simpleitk nibabel pydicom highdicom reportlab pydantic pydantic_core annotated-types
typing-inspection dask distributed partd locket tblib zict tornado pypdf"
EXTRA="pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle"
pin() {  # NAME -> NAME==VERSION as installed in .venv
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1")
  echo "$1==$v"
}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl /tmp/gsite && mkdir -p .whl/dl /tmp/gsite
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
specs=(); for p in $PKGS; do specs+=("$(pin "$p")"); done
"$PY" -m pip download -q "${args[@]}" -d .whl/dl "${specs[@]}"
extra=(); for p in $EXTRA; do extra+=("$(pin "$p")"); done
"$PY" -m pip download -q "${args[@]}" -d .whl "${extra[@]}"
for w in .whl/dl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/gsite; done
rm -rf .whl/dl
(cd /tmp/gsite && tar cf - . | xz -T0 -9) >.whl/gsite.tar.xz
ls -la .whl
