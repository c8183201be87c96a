#!/usr/bin/env bash
# BrainG3N at the paper presets on a GPU cluster: the whole chain, one step per call.
#
#   tools/cluster/paper_chain.sh STEP [ARGS]        (docs/cluster.md walks through it)
#
# Steps, in order (each is resumable: re-run the same step after a preemption and it continues
# from its last checkpoint or skips work that is complete):
#   ingest              discover every cohort of $G3N_SOURCES into $G3N_RUN/ingest/<name>   (CPU)
#   preprocess [i]      part i of $G3N_PARTS of every cohort (job array; i defaults to
#                       $SLURM_ARRAY_TASK_ID, 1-based)                                          (CPU or 1 GPU for HD-BET)
#   merge               merge the parts into $G3N_RUN/volumes, check it, split by subject       (CPU)
#   mae                 pretrain the MAE with the deepspeed launcher on $G3N_HOSTFILE           (multi-node GPUs)
#   encode              export the encoder, tokens set (mean 1152-vectors) of every volume      (1 GPU)
#   tokenizer           train the phase-2 tokenizer (frozen encoder, c = 32) with deepspeed     (multi-node GPUs)
#   latents             latents set of every volume, and its train/test subsets                (1 GPU)
#   dit                 train the conditional flow-matching DiT with deepspeed                  (multi-node GPUs)
#   sample              generate the Table-2a requests of configs/paper/sample_requests.jsonl  (1 GPU)
#   probe               the 23-task probe panel on the tokens set                               (CPU, 16 cores)
#   eval                reconstruction, controllability, fidelity, memorisation, HTML report   (1 GPU)
#   all                 every step in order on this node (a single-node allocation)
#
# Environment (defaults in brackets):
#   G3N_RUN             run folder on storage every node sees (required)
#   G3N_SOURCES         space-separated KIND:PATH inputs, KIND = bids | csv | dicom, e.g.
#                       "bids:/data/ADNI csv:/data/IXI/ixi.csv" (required for ingest)
#   G3N_CONFIGS         [configs/paper] the stage YAMLs
#   G3N_HOSTFILE        [configs/cluster/hostfile] DeepSpeed hostfile ("host slots=N" lines)
#   G3N_NUM_NODES       [1]   nodes for the deepspeed launcher
#   G3N_GPUS_PER_NODE   [4]   GPUs per node
#   MASTER_ADDR         [first host of the hostfile] rendezvous host; MASTER_PORT [29500]
#   G3N_PARTS           [16]  preprocessing job-array size;  G3N_WORKERS [8] processes per part
#   G3N_SKULLSTRIP      [from data.yaml: hdbet] override: robex (CPU) | hdbet | atlas | none
#   G3N_STOP_AT         stop training at this step (then re-submit: the run resumes)
#   G3N_VOLUMES         [$G3N_RUN/volumes] volumes set the training stages read: a folder or a
#                       WebDataset URL prefix (see docs/cluster.md, "Shards on object storage")
#   G3N_LATENTS_TRAIN   [$G3N_RUN/latents-train] latents set the DiT trains on (folder or URL)
set -euo pipefail

: "${G3N_RUN:?set G3N_RUN to the run folder (shared storage)}"
CONFIGS=${G3N_CONFIGS:-configs/paper}
HOSTFILE=${G3N_HOSTFILE:-configs/cluster/hostfile}
NUM_NODES=${G3N_NUM_NODES:-1}
GPUS=${G3N_GPUS_PER_NODE:-4}
PARTS=${G3N_PARTS:-16}
WORKERS=${G3N_WORKERS:-8}
RUN=$G3N_RUN
VOLUMES=${G3N_VOLUMES:-$RUN/volumes}
VOLUMES_TRAIN=${G3N_VOLUMES_TRAIN:-$RUN/volumes-train}
LATENTS_TRAIN=${G3N_LATENTS_TRAIN:-$RUN/latents-train}
MASTER_PORT=${MASTER_PORT:-29500}
STOP_AT=()
[[ -n "${G3N_STOP_AT:-}" ]] && STOP_AT=(--stop-at "$G3N_STOP_AT")
SKULL=()
[[ -n "${G3N_SKULLSTRIP:-}" ]] && SKULL=(--skullstrip "$G3N_SKULLSTRIP")

# NCCL: fail fast instead of hanging on a dead peer; pick the fabric interface if the site needs it.
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

log() { printf '[paper_chain %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
done_set() { [[ -f "$1/manifest.json" ]]; }  # a shard set is complete once its manifest exists

# The deepspeed launcher: one process per GPU on every host of the hostfile. --no_local_rank:
# the stages read LOCAL_RANK from the environment the launcher sets.
ds_launch() {
  local master=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
  deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS" \
    --master_addr "$master" --master_port "$MASTER_PORT" --no_local_rank "$@"
}

keys_of() {  # keys_of SPLIT -> RUN/keys-SPLIT.json from the subject-level split
  python -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["keys"][sys.argv[2]]))' \
    "$RUN/splits.json" "$1" > "$RUN/keys-$1.json"
}

step_ingest() {
  : "${G3N_SOURCES:?set G3N_SOURCES, e.g. \"bids:/data/ADNI csv:/data/IXI/ixi.csv\"}"
  for src in $G3N_SOURCES; do
    local kind=${src%%:*} path=${src#*:}
    local name
    name=$(basename "$path")
    name=${name%.*}  # a CSV manifest's stem, or the BIDS/DICOM folder's name
    log "ingest $kind $path -> $RUN/ingest/$name"
    g3n-data ingest "$kind" "$path" --out "$RUN/ingest/$name"
  done
}

step_preprocess() {
  local i=${1:-${SLURM_ARRAY_TASK_ID:-1}}
  for wl in "$RUN"/ingest/*/worklist.jsonl; do
    local name
    name=$(basename "$(dirname "$wl")")
    log "preprocess $name part $i/$PARTS"
    g3n-data preprocess "$wl" --out "$RUN/parts/$name/part-$i" --config "$CONFIGS/data.yaml" "${SKULL[@]}" \
      --workers "$WORKERS" --part "$i/$PARTS" --cache "$RUN/cache/$name" --no-progress
  done
}

step_merge() {
  if ! done_set "$RUN/volumes"; then
    g3n-data preprocess --merge "$RUN"/parts/*/part-* --out "$RUN/volumes"
  fi
  g3n-data check "$RUN/volumes"
  g3n-data split --in "$RUN/volumes" --out "$RUN/splits.json" --fractions 0.8,0.1,0.1 --seed 2025
  for s in train test; do
    keys_of "$s"
    done_set "$RUN/volumes-$s" || g3n-shards subset "$RUN/volumes" "$RUN/volumes-$s" --keys "$RUN/keys-$s.json"
  done
}

step_mae() {
  local resume=()
  [[ -f "$RUN/mae/checkpoints/latest.json" ]] && resume=(--resume)
  log "MAE on $NUM_NODES x $GPUS GPUs, data $VOLUMES_TRAIN"
  ds_launch "$(which g3n-mae)" train --config "$CONFIGS/mae.yaml" --data "$VOLUMES_TRAIN" \
    --run-dir "$RUN/mae" "${resume[@]}" "${STOP_AT[@]}"
}

step_encode() {
  g3n-mae export "$RUN/mae" "$RUN/mae-export" --encoder-only
  done_set "$RUN/tokens" || g3n-mae encode "$RUN/mae-export" --volumes "$VOLUMES" --out "$RUN/tokens" \
    --store mean --batch-size 8 --device cuda --bf16
}

step_tokenizer() {
  local resume=()
  [[ -f "$RUN/tokenizer/last.safetensors" ]] && resume=(--resume)
  ds_launch "$(which g3n-tokenizer)" train --config "$CONFIGS/tokenizer.yaml" --volumes "$VOLUMES_TRAIN" \
    --mae-checkpoint "$RUN/mae-export" --out "$RUN/tokenizer" --engine deepspeed "${resume[@]}"
}

step_latents() {
  done_set "$RUN/latents" || g3n-tokenizer encode --volumes "$VOLUMES" \
    --checkpoint "$RUN/tokenizer/tokenizer.safetensors" --out "$RUN/latents" --batch-size 8 --device cuda
  for s in train test; do
    [[ -f "$RUN/keys-$s.json" ]] || keys_of "$s"
    done_set "$RUN/latents-$s" || g3n-shards subset "$RUN/latents" "$RUN/latents-$s" --keys "$RUN/keys-$s.json"
  done
}

step_dit() {
  # resumes from the run folder's latest checkpoint by itself
  ds_launch "$(which g3n-dit)" train --config "$CONFIGS/dit.yaml" --latents "$LATENTS_TRAIN" \
    --out "$RUN/dit" --engine deepspeed --precision bf16
}

step_sample() {
  done_set "$RUN/synthetic" || g3n-dit sample --checkpoint "$RUN/dit" --out "$RUN/synthetic" \
    --requests "$CONFIGS/sample_requests.jsonl" --steps 50 --guidance 1.5 --weights ema --precision bf16 --device cuda
}

step_probe() {
  g3n-probe run "$RUN/tokens" --out "$RUN/probe" --protocol "$CONFIGS/probe.yaml" --preset paper --quiet
}

step_eval() {
  local tok=(--tokenizer mae-cnn --tokenizer-checkpoint "$RUN/tokenizer/tokenizer.safetensors")
  g3n-eval recon --volumes "$RUN/volumes-test" "${tok[@]}" --out "$RUN/eval/recon" --device cuda --no-progress
  g3n-eval controllability --real "$RUN/tokens" --generated "$RUN/synthetic" --encoder "$RUN/mae-export" \
    "${tok[@]}" --out "$RUN/eval/controllability" --device cuda --no-progress
  g3n-eval fidelity --real "$RUN/volumes-test" --generated "$RUN/synthetic" "${tok[@]}" \
    --encoder "$RUN/mae-export" --out "$RUN/eval/fidelity" --device cuda --no-progress
  g3n-eval memorisation --synthetic "$RUN/synthetic" --train "$RUN/latents-train" --heldout "$RUN/latents-test" \
    --out "$RUN/eval/memorisation" --device cuda --no-progress
  g3n-eval report "$RUN"/eval/* --probe-run "$RUN/probe" --title "BrainG3N paper run" --out "$RUN/report" --no-progress
}

main() {
  local step=${1:-}
  shift || true
  case "$step" in
    ingest | preprocess | merge | mae | encode | tokenizer | latents | dit | sample | probe | eval)
      "step_$step" "$@" ;;
    all)
      step_ingest
      for ((i = 1; i <= PARTS; i++)); do step_preprocess "$i"; done
      for s in merge mae encode tokenizer latents dit sample probe eval; do "step_$s"; done ;;
    *)
      sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
      exit 2 ;;
  esac
}

main "$@"
