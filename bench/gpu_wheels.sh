#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks, into .gpu-wheels/ (git ignores it), for its Python 3.12 on
# x86_64 Linux; then check that the folder plus the working tree stay under the 64 MiB that travel to that machine.
#
# The GPU machine has no network. Its image has Python 3.12, torch 2.11 (CUDA), transformers 5.17, lightning 2.6.6,
# peft, torchmetrics, triton 3.6 and pytest, and so their dependencies (numpy, pyyaml, fsspec, aiohttp, httpx,
# huggingface_hub, accelerate, psutil, rich via typer, pygments, ...): docs/gpu.md lists what is assumed there.
# What sdlit, bench/trl_peer.py and bench/gpu_check.py need beyond that is below, pinned to the versions tested here,
# each downloaded without its dependencies (they are listed here one by one instead).
#
#     bash bench/gpu_wheels.sh            # or: make gpu-wheels
#     WHEELS_DIR=/tmp/w bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS_DIR="${WHEELS_DIR:-.gpu-wheels}"                       # carried to the GPU machine
CACHE_DIR="${CACHE_DIR:-$HOME/.cache/sdlit/gpu-wheel-downloads}"  # pip's downloads, as published
PYTHON="${PYTHON:-.venv/bin/python}"
LIMIT_MIB="${LIMIT_MIB:-64}"    # the working tree plus carried folders
REPACK_MIB="${REPACK_MIB:-4}"   # wheels larger than this are re-compressed with LZMA

WHEELS=(
    # LightningCLI (sdlit's command line): jsonargparse[signatures]
    "jsonargparse==4.53.0" "docstring-parser==0.18.0" "typeshed-client==2.15.0"
    # datasets (TRL imports it; sdlit's offline rollouts) and what it needs beyond the image
    "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" "xxhash==4.1.0" "pyarrow==26.0.1"
    "pandas==3.1.1" "python-dateutil==4.0.0" "tzdata==2026.6"
    "requests==2.34.2" "charset-normalizer==3.5.3" "urllib3==2.8.0"  # sdlit.critics.http imports requests
    "gguf==0.19.0"         # sdlit.models: the packaged SmolLM2 is a GGUF file (not used by the check)
    "trl==1.16.0"          # bench/trl_peer.py: the peer of the step benchmark
    "liger-kernel==0.8.5"  # bench/gpu_divergence.py: the Liger-Kernel side of the divergence benchmark
    "rich==15.0.0"         # sdlit's evaluation tables and progress bar (the image likely has it through typer)
    "setuptools==84.2.1"   # pip install --no-build-isolation -e . of sdlit, offline (pyproject: setuptools>=77)
)
# manylinux tags the GPU machine accepts (glibc 2.28 or later assumed); pip does not widen one tag to older ones
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)

platform_flags=()
for tag in "${PLATFORMS[@]}"; do
    platform_flags+=(--platform "$tag")
done

# pip downloads into a cache (it skips what is there with the right hash); the carried folder gets exactly the pinned
# wheels, those over REPACK_MIB re-compressed with LZMA: a zip method that Python's zipfile, and so pip, installs;
# the files and RECORD inside are unchanged. pyarrow's wheel (52 MiB as published) would not fit otherwise.
mkdir -p "$CACHE_DIR" "$WHEELS_DIR"
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.12 "${platform_flags[@]}" --no-deps \
    -d "$CACHE_DIR" "${WHEELS[@]}"

wanted=()
for spec in "${WHEELS[@]}"; do
    name="$(echo "${spec%%==*}" | tr '-' '_')"
    version="${spec##*==}"
    found=$(find "$CACHE_DIR" -maxdepth 1 -iname "${name}-${version}-*.whl")
    if [ "$(echo "$found" | grep -c .)" -ne 1 ]; then
        echo "gpu_wheels: expected one wheel of $spec in $CACHE_DIR, found: ${found:-none}" >&2
        exit 1
    fi
    wanted+=("$found")
done
"$PYTHON" - "$WHEELS_DIR" "$REPACK_MIB" "${wanted[@]}" <<'PY'
"""Put exactly the pinned wheels in the carried folder (an older pin left there would be installed beside the new one),
re-compressing those over the size limit with LZMA; a wheel already there under its name (same version) is kept."""
import shutil
import sys
import zipfile
from pathlib import Path

folder, limit, wheels = Path(sys.argv[1]), float(sys.argv[2]) * 2**20, [Path(p) for p in sys.argv[3:]]
for stale in set(folder.glob("*.whl")) - {folder / w.name for w in wheels}:
    stale.unlink()
for wheel in wheels:
    target, partial = folder / wheel.name, folder / (wheel.name + ".partial")
    if target.exists():
        continue
    if wheel.stat().st_size <= limit:
        shutil.copyfile(wheel, partial)
    else:
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_LZMA) as out:
            for info in source.infolist():
                data = source.read(info)
                info.compress_type = zipfile.ZIP_LZMA
                out.writestr(info, data)
        print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {partial.stat().st_size / 2**20:.1f} MiB (LZMA)")
    partial.rename(target)  # a run cut short leaves no half-written wheel under a wheel's name
PY

# What travels: the working tree (tracked files and untracked files git does not ignore) plus the wheel folder.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
wheel_bytes=$(find "$WHEELS_DIR" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tree_bytes + wheel_bytes))
limit=$((LIMIT_MIB * 1024 * 1024))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels: $(find "$WHEELS_DIR" -maxdepth 1 -name '*.whl' | wc -l) files, $(mib "$wheel_bytes") in $WHEELS_DIR"
echo "working tree: $(mib "$tree_bytes")"
echo "together: $(mib "$total") of the $LIMIT_MIB MiB that travel to the GPU machine"
if [ "$total" -gt "$limit" ]; then
    echo "gpu_wheels: $(mib "$total") is over the $LIMIT_MIB MiB limit: drop wheels the GPU machine has" >&2
    exit 1
fi
