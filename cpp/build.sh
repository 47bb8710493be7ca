#!/usr/bin/env bash
# Build turbotrt's C++ library and example into cpp/build/ (and nowhere else).
#
#   cpp/build.sh [--install-deps] [--tensorrt DIR] [--python PYTHON]
#
# Idempotent: a second run only checks what is there and lets CMake rebuild what changed.
# What it needs, and where it gets it:
#   cmake, g++, pkg-config, sentencepiece, nlohmann-json, FFmpeg   Debian packages (--install-deps
#   (and optionally OpenSSL's libcrypto)                            installs the missing ones; root)
#   ONNX Runtime's shared library   the `onnxruntime` wheel of PYTHON (default: the repo's .venv);
#                                   symlinked under cpp/build/deps as libonnxruntime.so.1 (its SONAME)
#   ONNX Runtime's C/C++ headers    ORT_INCLUDE_DIR, else /usr/include/onnxruntime (Debian 13's
#                                   libonnxruntime-dev), else that package's files fetched with
#                                   `apt-get download` from this machine's own Debian mirror, suite
#                                   trixie, in a private apt state folder, unpacked with `dpkg -x`
#   TensorRT (optional)             --tensorrt DIR (or TENSORRT_ROOT): DIR/include/NvInfer.h and
#                                   DIR/lib/libnvinfer.so, plus the CUDA toolkit
# Any failure ends with one line: what is missing and how to get it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BUILD="$HERE/build"
DEPS="$BUILD/deps"
JOBS=${JOBS:-2}

say() { echo "cpp/build.sh: $*"; }
die() { echo "cpp/build.sh: error: $*" >&2; exit 1; }

INSTALL_DEPS=0
TENSORRT=${TENSORRT_ROOT:-}
PYTHON=${PYTHON:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --install-deps) INSTALL_DEPS=1 ;;
    --tensorrt) [ $# -ge 2 ] || die "--tensorrt needs a folder"; TENSORRT=$2; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option $1 (see cpp/build.sh --help)" ;;
  esac
  shift
done

# --- Debian packages -------------------------------------------------------------------------------
find_missing() {
  missing=()
  for tool in cmake:cmake g++:g++ pkg-config:pkg-config make:make; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
  done
  for mod in sentencepiece:libsentencepiece-dev nlohmann_json:nlohmann-json3-dev libavformat:libavformat-dev \
             libavcodec:libavcodec-dev libswscale:libswscale-dev libavutil:libavutil-dev; do
    if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists "${mod%%:*}"; then
      missing+=("${mod#*:}")
    fi
  done
}
find_missing
# Optional: OpenSSL's libcrypto hashes bundles several times faster than the portable code.
if [ "$INSTALL_DEPS" = 1 ] && command -v pkg-config >/dev/null 2>&1 && ! pkg-config --exists libcrypto; then
  missing+=(libssl-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$INSTALL_DEPS" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root; run: sudo apt-get install -y ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null 2>&1 || true  # a fresh machine may have no package lists yet
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed; run it by hand to see why"
    find_missing
    [ ${#missing[@]} -eq 0 ] || die "still missing after apt-get install: ${missing[*]} (pkg-config cannot find them)"
  else
    die "missing Debian packages: ${missing[*]}; install them with: apt-get install -y ${missing[*]} (or run cpp/build.sh --install-deps as root)"
  fi
fi
say "tools and Debian packages: present (sentencepiece $(pkg-config --modversion sentencepiece), FFmpeg libavcodec $(pkg-config --modversion libavcodec))"
pkg-config --exists libcrypto || say "note: libssl-dev is not installed; bundle hashes use the slower portable sha256 (apt-get install -y libssl-dev)"

# --- ONNX Runtime's library, from the Python wheel --------------------------------------------------
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CAPI=$("$PYTHON" -c 'import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null) \
  || die "cannot import onnxruntime with $PYTHON; create the venv first (README: python3 -m venv .venv && .venv/bin/pip install ...) or pass --python"
ORT_VERSION=$("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)')
ORT_SO=$(ls "$CAPI"/libonnxruntime.so.[0-9]* 2>/dev/null | head -n 1 || true)
[ -n "$ORT_SO" ] || die "$CAPI has no libonnxruntime.so.*; reinstall the onnxruntime wheel ($PYTHON -m pip install --force-reinstall onnxruntime)"
ORT_ROOT="$DEPS/onnxruntime"
mkdir -p "$ORT_ROOT/lib"
# The wheel names the file libonnxruntime.so.<version>; the linker wants libonnxruntime.so and the
# loader its SONAME, libonnxruntime.so.1. Execution providers load from the same folder.
ln -sfn "$ORT_SO" "$ORT_ROOT/lib/libonnxruntime.so.1"
ln -sfn "$ORT_SO" "$ORT_ROOT/lib/libonnxruntime.so"
for p in "$CAPI"/libonnxruntime_providers_*.so; do
  [ -e "$p" ] && ln -sfn "$p" "$ORT_ROOT/lib/$(basename "$p")"
done
say "ONNX Runtime $ORT_VERSION library: $ORT_SO"

# --- ONNX Runtime's headers -------------------------------------------------------------------------
fetch_headers() {
  # Debian 13 (trixie) packages the headers as libonnxruntime-dev; fetch only that package's files
  # with a private source list and state, so this machine's own apt configuration stays untouched.
  local apt="$DEPS/apt" codename uri deb
  command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 \
    || die "ONNX Runtime's headers are missing and this is not a Debian system; put them in a folder and pass ORT_INCLUDE_DIR=that folder"
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk -v c="$codename" '$2 == c { print $1; exit }')
  [ -n "$uri" ] || die "no Debian mirror for '$codename' in this machine's apt configuration; put ONNX Runtime's headers in a folder and pass ORT_INCLUDE_DIR=that folder"
  [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] \
    || die "/usr/share/keyrings/debian-archive-keyring.gpg is missing; install it with: apt-get install -y debian-archive-keyring"
  mkdir -p "$apt/etc/sources.list.d" "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$apt/etc/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$apt/etc/sources.list" -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o "Dir::State::status=/dev/null"
              -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
  say "fetching libonnxruntime-dev (Debian 13, trixie) from $uri into cpp/build/deps"
  apt-get -qq "${opts[@]}" update >/dev/null 2>"$apt/update.log" \
    || die "apt-get update of the private trixie source list failed (see $apt/update.log); or put ONNX Runtime's headers in a folder and pass ORT_INCLUDE_DIR=that folder"
  (cd "$apt/debs" && rm -f ./*.deb && apt-get -qq "${opts[@]}" download libonnxruntime-dev >/dev/null 2>"$apt/download.log") \
    || die "apt-get download libonnxruntime-dev failed (see $apt/download.log); or put ONNX Runtime's headers in a folder and pass ORT_INCLUDE_DIR=that folder"
  deb=$(ls "$apt"/debs/libonnxruntime-dev_*.deb | head -n 1)
  rm -rf "$DEPS/libonnxruntime-dev"
  dpkg -x "$deb" "$DEPS/libonnxruntime-dev"
  say "unpacked $(basename "$deb")"
}

ORT_INC="$ORT_ROOT/include"
if [ -n "${ORT_INCLUDE_DIR:-}" ]; then
  [ -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ] || die "ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR has no onnxruntime_cxx_api.h"
  ln -sfn "$ORT_INCLUDE_DIR" "$ORT_INC"
elif [ ! -f "$ORT_INC/onnxruntime_cxx_api.h" ]; then
  if [ -f /usr/include/onnxruntime/onnxruntime_cxx_api.h ]; then
    ln -sfn /usr/include/onnxruntime "$ORT_INC"
  else
    [ -f "$DEPS/libonnxruntime-dev/usr/include/onnxruntime/onnxruntime_cxx_api.h" ] || fetch_headers
    ln -sfn "$DEPS/libonnxruntime-dev/usr/include/onnxruntime" "$ORT_INC"
  fi
fi
HEADER_API=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$ORT_INC/onnxruntime_c_api.h")
LIB_MINOR=$(echo "$ORT_VERSION" | cut -d. -f2)
[ -n "$HEADER_API" ] || die "cannot read ORT_API_VERSION from $ORT_INC/onnxruntime_c_api.h"
# The C API is versioned and backward compatible: headers of API N work with any library >= 1.N.
[ "$HEADER_API" -le "$LIB_MINOR" ] \
  || die "ONNX Runtime headers (API $HEADER_API) are newer than the library ($ORT_VERSION); install onnxruntime>=1.$HEADER_API or use older headers (ORT_INCLUDE_DIR)"
say "ONNX Runtime headers: API version $HEADER_API ($(readlink -f "$ORT_INC"))"

# --- configure and build -----------------------------------------------------------------------------
CMAKE_ARGS=(-S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_ROOT="$ORT_ROOT")
if [ -n "$TENSORRT" ]; then
  [ -f "$TENSORRT/include/NvInfer.h" ] || die "--tensorrt $TENSORRT has no include/NvInfer.h (TensorRT >= 10.9 from NVIDIA)"
  CMAKE_ARGS+=(-DTURBOTRT_WITH_TENSORRT=ON -DTENSORRT_ROOT="$TENSORRT")
  say "TensorRT backend: on ($TENSORRT)"
else
  CMAKE_ARGS+=(-DTURBOTRT_WITH_TENSORRT=OFF)
fi
say "configuring (cmake) in cpp/build"
cmake "${CMAKE_ARGS[@]}" >"$BUILD/configure.log" 2>&1 || { tail -n 20 "$BUILD/configure.log" >&2; die "cmake configure failed (log: $BUILD/configure.log)"; }
say "building with $JOBS jobs"
nice -n 10 cmake --build "$BUILD" -j "$JOBS" >"$BUILD/build.log" 2>&1 || { grep -m 20 -E "error|Error" "$BUILD/build.log" >&2 || tail -n 20 "$BUILD/build.log" >&2; die "build failed (log: $BUILD/build.log)"; }
say "built cpp/build/bin/turbotrt_run, cpp/build/bin/turbotrt_check and cpp/build/libturbotrt.a"
