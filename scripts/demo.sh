#!/usr/bin/env bash
# lorareg's main job, end to end and offline: build a tiny base model, train two LoRAs on the
# bundled dataset (examples/data), register them, convert one, merge them with exact weights,
# shrink the merge by SVD, render sample images with it, and list the catalog.
#
#     scripts/demo.sh [OUTPUT_DIR]          (default: demo-output)
#
# Everything is written under OUTPUT_DIR, including the catalog (LORAREG_HOME=OUTPUT_DIR/catalog),
# so the user's own catalog is never touched. The virtual environment .venv is created first if it
# is missing (scripts/bootstrap.sh); after that nothing needs the network. With network access the
# same commands train on a real model: set base_model in examples/train_config.toml (and
# resolution = 512) instead of --base.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-demo-output}"
MARKER=".lorareg-demo-output"

bash scripts/bootstrap.sh
LORAREG=(.venv/bin/lorareg)

if [ -e "$OUT" ] && [ ! -e "$OUT/$MARKER" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "demo: $OUT exists and was not made by this demo; give another output folder" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"
touch "$OUT/$MARKER"
OUT="$(cd "$OUT" && pwd)"

export LORAREG_HOME="$OUT/catalog"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# The tiny model's operations are too small to share between threads: one thread is fastest, and
# it stays fast when other programs keep the cores busy (a second, spinning thread then crawls).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

START=$SECONDS
step() {
    local title=$1
    shift
    printf '\n\033[1m== %s\033[0m\n$ lorareg' "$title"
    local arg
    for arg in "$@"; do  # quote only what needs it, as a person would type it
        if [[ $arg =~ ^[A-Za-z0-9._/:=@,+-]+$ ]]; then printf ' %s' "$arg"; else printf " '%s'" "$arg"; fi
    done
    printf '\n'
    "${LORAREG[@]}" "$@"
}

step "1/8  Build a tiny SD1-shaped base model (random weights, real module names)" \
    tiny-model "$OUT/base" --arch sd1

step "2/8  Train the 'pxl-style' LoRA on examples/data (registered in the catalog)" \
    train examples/train_config.toml --base "$OUT/base" -o "$OUT/train/pxl-style"

step "3/8  Train a second LoRA: another seed, rank 4, no samples" \
    train examples/train_config.toml --base "$OUT/base" -o "$OUT/train/pxl-alt" --name pxl-alt \
    --rank 4 --seed 7 --sample-prompts none --save-every-n-epochs none --no-tensorboard

step "4/8  Convert pxl-style to a PEFT folder (same ΔW, other key names)" \
    convert pxl-style --to peft -o "$OUT/converted/pxl-style_peft"

mkdir -p "$OUT/composed"
step "5/8  Merge the two with exact weights 0.7 and 0.3 (catalog names as inputs)" \
    merge pxl-style:0.7 pxl-alt:0.3 -o "$OUT/composed/pxl-mix.safetensors"

step "6/8  Resize the merge (rank 12) to rank 4 by exact SVD" \
    resize "$OUT/composed/pxl-mix.safetensors" --rank 4 -o "$OUT/composed/pxl-mix-r4.safetensors"

step "7/8  Generate sample images with the resized adapter at weight 0.8" \
    generate "pxl style, a red circle on a light background" --base "$OUT/base" \
    --lora "$OUT/composed/pxl-mix-r4.safetensors:0.8" -n 4 --seed 7 --steps 20 -o "$OUT/samples"

step "8/8  The catalog" \
    list

printf '\n\033[1m== Done in %ss. Everything is under %s/:\033[0m\n' "$((SECONDS - START))" "$OUT"
cat <<EOF
  base model        $OUT/base/                      (lorareg tiny-model)
  trained adapters  $OUT/train/pxl-style/pxl-style.safetensors
                    $OUT/train/pxl-alt/pxl-alt.safetensors
  checkpoints       $OUT/train/*/checkpoints/      (lorareg train ... --resume latest)
  training samples  $OUT/train/pxl-style/samples/
  TensorBoard logs  $OUT/train/pxl-style/runs/     (tensorboard --logdir $OUT/train/pxl-style/runs)
  converted         $OUT/converted/pxl-style_peft/
  merged, resized   $OUT/composed/pxl-mix.safetensors, $OUT/composed/pxl-mix-r4.safetensors
  generated images  $OUT/samples/                  (A1111 parameters inside each PNG)
  catalog           $OUT/catalog/

lorareg is installed in $(pwd)/.venv: run it as $(pwd)/.venv/bin/lorareg, or activate
the environment first (source $(pwd)/.venv/bin/activate). The demo's catalog is in $OUT/catalog:

  LORAREG_HOME=$LORAREG_HOME $(pwd)/.venv/bin/lorareg show pxl-mix-r4
EOF
