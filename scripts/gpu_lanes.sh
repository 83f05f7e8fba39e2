#!/usr/bin/env bash
# Both GPU lanes on the real model on the device tool's offline GPU machine, side by side (or one after the other with
# SEQ=1), each lane's report merged with the previous call's (gpu_lane keeps the rows of an earlier run of the same
# lane in its --out folder), so a course longer than one 10-minute call runs in groups of notebooks.
#
# Before, here:  make setup model; bash ../shared/gpu/bundle.sh; bash scripts/gpu_llama_bundle.sh
#                bash scripts/gpu_stage_model.sh split
#                (optional, to merge with an earlier run: cp results/gpu-lane-real-{bf16,t4}.json .gpu/prev-{bf16,t4}.json)
# There, back to back (the machine and its /tmp last ~30 s after a call); the bundle is unpacked into /tmp/site by the
# first call, so later calls carry only what they add (64 MiB a call):
#   carry .gpu:     mkdir -p /tmp/site && tar -C /tmp/site -xzf .gpu/site312.tgz && tar -C /tmp -xzf .gpu/llama-extra.tgz \
#                   && touch /tmp/site/.done
#                   (add .gpu-q, from scripts/gpu_unsloth_gguf_bundle.sh, to the call that runs notebook 13: Unsloth's
#                   save_pretrained_gguf then finds llama.cpp offline, below)
#   carry .gpu-m1:  bash scripts/gpu_stage_model.sh put .gpu-m1
#   carry .gpu-m2:  bash scripts/gpu_stage_model.sh put .gpu-m2 && W=5 OMP=2 bash scripts/gpu_lanes.sh A 520 "<06 07 09 11 12>" "<same>"
#   no carry:       W=3 OMP=4 bash scripts/gpu_lanes.sh B 450 "<00-05 10>" "<same>"
#   no carry:       OMP=8 bash scripts/gpu_lanes.sh C 300 "notebooks/08_merge_and_export.ipynb" "<same>" "" tests
# Measured on one H100 on 2026-12-06: setup (join + model build) 47 s; call A 525 s (09 ~460 s is the longest); call B
# 00-05 in ~300 s. Each lane side by side on its own half of the CPUs (below). On 2026-12-07 (one H100) 09's 40-run grid
# finished in both lanes side by side with 06 in 418 s with PARAMS="--param WORKERS=4" W=2 OMP=2 PIN=0 (2 workers, its
# default, had reached 22 of 40 runs in 540 s).
# Arguments: TAG TIMEOUT(per lane, s) "bf16 lane notebooks" "T4 lane notebooks" [SOLO notebook numbers] [tests]
# (a lane not in LANES ignores its notebook list)
# Output: $OUT/lanes-TAG.tgz (both lanes' gpu-lane.json/.md, logs, executed notebooks); copy each gpu-lane.json to
# results/gpu-lane-real-{bf16,t4}.json and run `python -m lora_course.readme --write`.
set -u
TAG=$1 T=$2 NB1=$3 NB2=$4 SOLO=${5:-} TESTS=${6:-}
t0=$(date +%s)
mkdir -p /tmp/site && [ -f /tmp/site/.done ] || { tar -C /tmp/site -xzf .gpu/site312.tgz && tar -C /tmp -xzf .gpu/llama-extra.tgz && touch /tmp/site/.done; }
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LORA_COURSE_CACHE=/tmp/lcc
export OMP_NUM_THREADS=${OMP:-8}
python3 -m ipykernel install --user --name python3 >/dev/null 2>&1
M=/tmp/lcc/models/SmolLM2-135M-Instruct-Q4_1-v1
[ -f $M/config.json ] || bash scripts/gpu_stage_model.sh join || exit 3
for l in bf16 t4; do mkdir -p /tmp/lane-$l; [ -f /tmp/lane-$l/gpu-lane.json ] || [ ! -f .gpu/prev-$l.json ] || cp .gpu/prev-$l.json /tmp/lane-$l/gpu-lane.json; done
# Each lane is a learner's machine of its own: its own course cache (exports, course adapters, llama.cpp probes), with
# only the read-only inputs shared (the model folder, the converter). On 2026-12-06 both lanes' notebook 08 wrote the
# same exports/08-creative folder at once: the T4 lane compared its own merged model with GGUFs the bf16 lane had
# converted from a different adapter (F32 "parity" KL 0.037, decisive on 28% of positions) and failed; 07's course
# adapters were likewise trained by whichever lane came first, in that lane's precision.
for l in bf16 t4; do
  mkdir -p /tmp/lcc-$l; for d in models llama.cpp-converter; do [ -e /tmp/lcc/$d ] && ln -sfn /tmp/lcc/$d /tmp/lcc-$l/$d; done
done
echo "setup $(( $(date +%s) - t0 )) s"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; lscpu | grep -i 'model name'
sk=--skip-tests; [ -n "$TESTS" ] && sk=
# Each lane runs its own copy of the notebooks, so each papermill kernel has its own working directory (papermill's
# --cwd is the notebook's folder): Unsloth's save_pretrained_gguf (notebook 13) has llama.cpp's converter write the
# GGUF under a bare file name (the model folder's name + .Q8_0.gguf) into the working directory, then moves it. On
# 2026-12-07 at 16:01 and 18:07 both lanes' 13 wrote the same ./SmolLM2-135M-Instruct-Q4_1-v1.Q8_0.gguf at once: one
# lane read the other lane's file (KL 0.033 from its own merge, and "cannot read it back" at 16:01), the other found
# its file gone ("Conversion failed ... check disk space"). The notebooks find the course through PYTHONPATH.
lane_nbs() { local out=; for f in $2; do out="$out /tmp/lane-$1/nb/$(basename "$f")"; done; echo $out; }
for l in bf16 t4; do rm -rf /tmp/lane-$l/nb; mkdir -p /tmp/lane-$l/nb; cp notebooks/*.ipynb /tmp/lane-$l/nb/; done
NB1=$(lane_nbs bf16 "$NB1") NB2=$(lane_nbs t4 "$NB2")
so1=; so2=; for s in $SOLO; do f=$(basename "$(ls notebooks/${s}_*.ipynb)"); so1="$so1 --solo /tmp/lane-bf16/nb/$f"; so2="$so2 --solo /tmp/lane-t4/nb/$f"; done
# Side by side, each lane runs on its own half of the CPUs (taskset): notebook 08 sizes llama.cpp's and torch's thread
# pools by the CPUs it may use (hardware.usable_cpus), so two 08s on one 16-core host no longer start 32 spinning
# threads (on 2026-12-06 both lanes' 08 stalled in the speed cell that way and ran into the call's limit).
# PIN=0 leaves the lanes unpinned: notebooks without 08 ran 2-4x slower pinned with W=5 on 8 CPUs a lane (06, 07
# and 09 missed a 540 s limit they met unpinned), so pin the group that holds 08 and no other.
pin1= pin2=
if [ -z "${SEQ:-}" ] && [ "${PIN:-1}" = 1 ] && command -v taskset >/dev/null; then
  n=$(nproc); h=$(( n / 2 )); [ "$h" -ge 1 ] && { pin1="taskset -c 0-$(( h - 1 ))"; pin2="taskset -c $h-$(( n - 1 ))"; }
fi
# Unsloth's save_pretrained_gguf (notebook 13) offline: the llama.cpp folder of scripts/gpu_unsloth_gguf_bundle.sh,
# carried as .gpu-q, one writable copy per lane (Unsloth writes its patched converter into the folder).
for l in bf16 t4; do
  [ -x .gpu-q/llama.cpp/llama-quantize ] && { rm -rf /tmp/llama.cpp-$l; cp -r .gpu-q/llama.cpp /tmp/llama.cpp-$l; }
done
unsloth_gguf_env() {
  [ -x /tmp/llama.cpp-$1/llama-quantize ] || return 0
  # and its converter staging cache per lane too: on 2026-12-07 16:02, with one cache (~/.unsloth) for both lanes, the
  # bf16 lane's GGUF could not be read back by the gguf-py it was written with while the T4 lane exported the same way
  # (the same bf16 -> Q8_0 conversion with this folder's converter reads back fine alone)
  export UNSLOTH_LLAMA_CPP_PATH=/tmp/llama.cpp-$1 UNSLOTH_LLAMA_CPP_SCRIPTS_DIR=/tmp/llama.cpp-$1 \
    UNSLOTH_LLAMA_CPP_OFFLINE=1 UNSLOTH_AUTO_INSTALL=0 UNSLOTH_LLAMA_CPP_CONVERTER_CACHE=/tmp/unsloth-converter-$1
}
run_bf16() { unsloth_gguf_env bf16; LORA_COURSE_CACHE=/tmp/lcc-bf16 timeout $T $pin1 python3 -m lora_course.gpu_lane --out /tmp/lane-bf16 --profile gpu --model-id $M --workers ${W:-2} $PARAMS $sk $so1 $NB1 > /tmp/lane-bf16/run-$TAG.log 2>&1; }
run_t4() { unsloth_gguf_env t4; LORA_COURSE_CACHE=/tmp/lcc-t4 timeout $T $pin2 python3 -m lora_course.gpu_lane --out /tmp/lane-t4 --profile colab --emulate t4 --model-id $M --workers ${W:-2} $PARAMS $sk $so2 $NB2 > /tmp/lane-t4/run-$TAG.log 2>&1; }
# PARAMS: notebook parameters for both lanes, e.g. PARAMS="--param WORKERS=4" (notebook 09's runs side by side).
PARAMS=${PARAMS:-}
# LANES: which lanes run (default both), e.g. LANES=t4 to re-run one lane's failed notebook.
LANES=${LANES:-bf16 t4}
if [ -n "${SEQ:-}" ]; then for l in $LANES; do run_$l; done; else for l in $LANES; do run_$l & done; wait; fi
for l in $LANES; do echo "== $l"; grep -E '^(ok|FAILED|SKIPPED)|lane report|Error|error' /tmp/lane-$l/run-$TAG.log | tail -30; done
# Notebook 09's live grid writes its records beside the notebooks (sweep.check_provenance: the lane's nb/build/
# experiments-<profile>.json, gpu for bf16, colab for the T4 lane): each lane's file goes back with its report, to be
# committed as results/experiments-gpu-<lane>.json with the hardware it names.
for l in $LANES; do p=gpu; [ "$l" = t4 ] && p=colab; cp /tmp/lane-$l/nb/build/experiments-$p.json /tmp/lane-$l/ 2>/dev/null || true; done
tar -C /tmp --exclude='lane-*/nb' --exclude='unsloth_compiled_cache' --exclude='*.gguf' --exclude='*.safetensors' --exclude='*.bin' -czf $OUT/lanes-$TAG.tgz $(for l in $LANES; do echo lane-$l; done)
ls -la $OUT; echo "total $(( $(date +%s) - t0 )) s"
