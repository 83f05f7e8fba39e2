#!/usr/bin/env bash
# A llama.cpp folder for Unsloth's `model.save_pretrained_gguf(...)` on an offline GPU machine: .gpu-q/llama.cpp/.
#
# unsloth_zoo's save path needs a llama.cpp install (check_llama_cpp: an executable `llama-quantize` in the folder)
# and llama.cpp's converter (convert_hf_to_gguf.py with its conversion/ package and gguf-py/); with no folder it
# downloads a prebuilt release from GitHub or clones and compiles one, which an offline host cannot. This assembles
#   llama-quantize       built here from the vendored llama.cpp of the pinned llama-cpp-python 0.3.36 sdist, static
#                        ggml/llama (-DBUILD_SHARED_LIBS=OFF), libstdc++/libgcc linked in, no OpenMP, no OpenSSL, with
#                        the course's portable flags (llama_build.py's avx2 tier: GGML_NATIVE=OFF, AVX2, no AVX-512,
#                        no AMX: a native build on the AMX Xeons crashed, issue 28), stripped; it needs glibc only;
#   convert_hf_to_gguf.py, conversion/, gguf-py/, convert_lora_to_gguf.py, LICENSE
#                        from the same sdist (identical to the course's converter, `lora_course.export
#                        --fetch-converter`), so the converter and the quantizer are one llama.cpp version.
# On the GPU machine (after copying .gpu-q/llama.cpp to, say, /tmp/llama.cpp), before Python starts:
#   export UNSLOTH_LLAMA_CPP_PATH=/tmp/llama.cpp          # check_llama_cpp / quantize_gguf find llama-quantize here
#   export UNSLOTH_LLAMA_CPP_SCRIPTS_DIR=/tmp/llama.cpp   # the converter is taken from here, never downloaded
#   export UNSLOTH_LLAMA_CPP_OFFLINE=1                    # converter staging never touches the network
#   export UNSLOTH_AUTO_INSTALL=0                         # no apt/pip/cmake installs if something is missing
# (UNSLOTH_LLAMA_CPP_PATH is read when unsloth_zoo.llama_cpp is imported: set it before `import unsloth`. The folder
# must stay writable: the export writes unsloth_convert_hf_to_gguf.py into it and patches conversion/base.py.)
# Measured 2026-12-07 on this 2-core Xeon (AVX-512 + AMX, Debian 12, gcc 12.2, glibc 2.36): the build with -j2 took
# 6 min 14 s (plus ~50 s for pip to download the 77 MB sdist when LORA_COURSE_LLAMA_SDIST is not given); a rerun
# reuses the cached build in seconds. The folder is 9.0 MiB (llama-quantize 6.9 MiB stripped). `ldd`: libc, libm,
# ld-linux only (needs GLIBC_2.36, for arc4random from the static libstdc++; the GPU image reports glibc 2.39);
# `objdump -d | grep -c zmm` = 0, no AMX tile instructions. With the network namespace removed (`unshare -rn`) and
# the four variables above: unsloth_zoo's check_llama_cpp() and _download_convert_hf_to_gguf() resolved to this
# folder, its convert_to_gguf() turned SmolLM2-135M-Instruct (LlamaForCausalLM) into an F16 GGUF in 18 s and its
# quantize_gguf() made Q4_K_M (101 MiB, 3 s) and Q8_0 (138 MiB, 2 s), with no connection attempted.
# .gpu-q/ is git-ignored (.gitignore: /.gpu-q/).
# Usage, from the project's root after `make setup model`:  bash scripts/gpu_unsloth_gguf_bundle.sh  -> .gpu-q/llama.cpp
#   LORA_COURSE_LLAMA_SDIST=/path/llama_cpp_python-0.3.36.tar.gz  uses a local sdist instead of downloading it;
#   JOBS=N  build parallelism (default 2).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
py=.venv/bin/python
if [ ! -x "$py" ]; then
  echo "error: no .venv here: run 'make setup' first" >&2
  exit 2
fi
for tool in cmake make g++ strip objdump; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to build llama-quantize" >&2; exit 2; }
done
version=$($py -c "import sys; sys.path.insert(0, 'src/lora_course'); import llama_build; print(llama_build.LLAMA_CPP_PIN)")
# The avx2 tier's exact CMake arguments, from the same function the course's llama-cpp-python build uses.
tier_args=$($py -c "import sys; sys.path.insert(0, 'src/lora_course'); import llama_build; print(' '.join(llama_build.cmake_args('avx2')))")
# shellcheck disable=SC2206
cmake_args=($tier_args -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_OPENMP=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc")
key=$(printf '%s ' "$version" "${cmake_args[@]}" | sha1sum | cut -c1-10)
cache=${LORA_COURSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-course}
built="$cache/llama-quantize/$version-avx2-$key"   # holds the stripped binary and the converter, published whole
if [ ! -x "$built/llama-quantize" ] || [ ! -f "$built/convert_hf_to_gguf.py" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  sdist=${LORA_COURSE_LLAMA_SDIST:-}
  if [ -z "$sdist" ]; then
    $py -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work/dl"
    sdist=$(ls "$work"/dl/llama_cpp_python-"$version".tar.gz)
  fi
  tar -C "$work" -xzf "$sdist" "llama_cpp_python-$version/vendor/llama.cpp"
  src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  echo "building llama-quantize (llama-cpp-python $version's llama.cpp): ${cmake_args[*]}"
  cmake -S "$src" -B "$work/build" "${cmake_args[@]}" >"$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-quantize -j "${JOBS:-2}" >"$work/build.log" 2>&1 ||
    { tail -50 "$work/build.log" >&2; exit 1; }
  out="$work/out"
  mkdir -p "$out"
  cp "$work/build/bin/llama-quantize" "$out/"
  strip "$out/llama-quantize"
  cp -r "$src/convert_hf_to_gguf.py" "$src/convert_lora_to_gguf.py" "$src/LICENSE" "$src/conversion" "$src/gguf-py" \
    "$out/"
  mkdir -p "$(dirname "$built")"
  rm -rf "$built.tmp"
  mv "$out" "$built.tmp" && mv "$built.tmp" "$built"
fi
bin="$built/llama-quantize"
# The portability checks the GPU hosts depend on: no AVX-512 (zmm registers) or AMX (tile) code, glibc only.
if objdump -d --no-show-raw-insn "$bin" | grep -Eq '%zmm|%k[0-7]\b|tileloadd|tdpb|ldtilecfg'; then
  echo "error: $bin has AVX-512 or AMX instructions: it was not built with the avx2 tier" >&2
  exit 1
fi
if ldd "$bin" | grep -Ev 'linux-vdso|libc\.so|libm\.so|libpthread\.so|libdl\.so|librt\.so|ld-linux' | grep -q .; then
  echo "error: $bin links more than glibc:" >&2
  ldd "$bin" >&2
  exit 1
fi
"$bin" --help >/dev/null 2>&1 || [ $? -eq 1 ]   # --help prints usage and exits 1
dest=.gpu-q/llama.cpp
mkdir -p .gpu-q
rm -rf "$dest.tmp"
cp -r "$built" "$dest.tmp"
find "$dest.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$dest"
mv "$dest.tmp" "$dest"   # replaced whole: a failed run leaves the previous folder
du -sh "$dest"
ls -la "$dest"
