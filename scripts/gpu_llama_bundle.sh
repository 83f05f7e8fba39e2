#!/usr/bin/env bash
# llama.cpp for notebook 08 on an offline GPU machine (`make test-gpu`), as a second bundle beside .gpu/site312.tgz.
#
# The GPU image has no llama.cpp, and llama-cpp-python 0.3.36 has no wheel on PyPI: this packs
#   site/  the llama_cpp runtime this checkout's .venv built from source with the course's portable flags
#          (llama_build.py's avx2 tier; checked below), ctypes shared libraries with no Python ABI, so the 3.11 build
#          loads under the GPU machine's 3.12, plus its server's pure-Python dependencies for 3.12;
#   lcc/   llama.cpp's converter scripts, extracted into the course cache layout (`python -m lora_course.export
#          --fetch-converter`).
# On the GPU machine, after the main bundle:  tar -C /tmp -xzf .gpu/llama-extra.tgz
# (merges into /tmp/site and into LORA_COURSE_CACHE=/tmp/lcc, the paths the GPU commands use).
# Measured 2026-11-26: the same contents (the runtime built here, these wheels, the converter) let notebook 08 pass in
# the GPU profile on a 2x H200 host, 32 cores, OMP_NUM_THREADS=16: 105 s (results/gpu-lane-h200.md); this script's
# bundle on one H200 (16 cores) with OMP_NUM_THREADS=16: 136 s. With OMP_NUM_THREADS unset, another H200 was still
# running it at 420 s: set OMP_NUM_THREADS to the core count.
# Usage, from the project's root after `make setup model`:  bash scripts/gpu_llama_bundle.sh  -> .gpu/llama-extra.tgz
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
py=.venv/bin/python
if [ ! -x "$py" ]; then
  echo "error: no .venv here: run 'make setup' first (it builds llama-cpp-python from source)" >&2
  exit 2
fi
lib=$($py -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))" 2>/dev/null) || {
  echo "error: llama_cpp is not installed in .venv: run 'make setup' (the export extra)" >&2
  exit 2
}
# Only the course's portable build travels (src/lora_course/llama_build.py: AVX2, no AVX-512, no AMX): the GPU hosts
# are Xeons with AMX, where a native build crashed decoding Q8_0/Q4_K_M (issue 28); this build decoded both there.
info=$($py -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())")
if echo "$info" | grep -Eq 'AMX_[A-Z0-9]+ = 1|AVX512 = 1'; then
  echo "error: .venv's llama.cpp was not built portably ($info): run" \
    "'LORA_COURSE_LLAMA_TIER=avx2 .venv/bin/python src/lora_course/llama_build.py --install' first" >&2
  exit 2
fi
conv=$($py -m lora_course.export --fetch-converter | sed -n 's/^llama.cpp converter ([^)]*): //p')
if [ ! -f "$conv/COMPLETE.json" ]; then
  echo "error: llama.cpp's converter was not found in the course cache ($conv): run 'make model'" >&2
  exit 2
fi
stage=$(mktemp -d) wh=$(mktemp -d)
trap 'rm -rf "$stage" "$wh"' EXIT
mkdir -p "$stage/site" "$stage/lcc/llama.cpp-converter"
# The server's dependencies (pure Python), the versions measured working with the GPU image.
pkgs="diskcache==5.6.3 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 sse-starlette==3.7.0 starlette-context==0.3.6
 pydantic-settings==2.16.3 anyio==4.16.0 h11==0.16.0 click==8.5.1 python-dotenv==1.2.4 annotated-doc==0.0.7
 opentelemetry-api==1.45.2 typing-extensions==4.16.0"
for p in $pkgs; do
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d "$wh" "$p" 2>&1 | grep -v 'is ignored' || true
done
n=$(ls "$wh"/*.whl 2>/dev/null | wc -l)
if [ "$n" -ne 14 ]; then
  echo "error: downloaded $n of 14 wheels into $wh: is the package index reachable?" >&2
  exit 1
fi
for w in "$wh"/*.whl; do unzip -q -o "$w" -d "$stage/site"; done
cp -r "$lib" "$stage/site/llama_cpp"
cp -r "$(dirname "$lib")"/llama_cpp_python-*.dist-info "$stage/site/"
cp -r "$conv" "$stage/lcc/llama.cpp-converter/"
mkdir -p .gpu
tmp=.gpu/llama-extra.tgz.tmp
tar -C "$stage" -czf "$tmp" .
mv "$tmp" .gpu/llama-extra.tgz   # published whole: a failed run leaves the previous bundle, never half a file
ls -la .gpu/llama-extra.tgz
