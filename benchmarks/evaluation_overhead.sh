#!/usr/bin/env bash
# Evaluation one variant at a time (a pack job, then an evaluate job that scores alone: two Python
# start-ups and two JVM start-ups per variant) against the workflow's way (a pack job that also
# captions, then one score job for all the variants), on the same artifacts and the same machine.
# Prints both wall times, their ratio, and checks that every variant's scores are equal.
#
#   benchmarks/evaluation_overhead.sh RUN_DIR [N]
# RUN_DIR: a finished default-experiment directory (benchmarks/default_experiment.sh leaves one);
# N: how many of its variants to evaluate (default 10). Run it alone on the machine.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
run=$(cd "$1" && pwd)
n=${2:-10}
ds=$(ls "$run/work")
prep=$run/work/$ds/prepared
beam=$("$py" -c "import yaml, sys; print((yaml.safe_load(open(sys.argv[1])).get('evaluate') or {}).get('beam_size', 3))" "$run/config.yaml")
out=$(mktemp -d /tmp/captioning-evalbench.XXXX)
mapfile -t variants < <(ls "$run/results/eval/$ds" | grep -v '_seed' | head -n "$n")
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "${#variants[@]} variants of $run, beam $beam, scratch $out"

pack() {  # variant, artifact path, extra pack options...
    local v=$1 model=$2
    shift 2
    IFS=- read -r enc dec dstage quant <<<"$v"
    "$py" -m captioning pack --encoder "$run/work/$ds/encoders/$enc.safetensors" \
        --decoder "$run/work/$ds/decoders/$enc/$dec/$dstage.safetensors" --prepared "$prep" \
        --quantization "$quant" --meta "{\"variant\": \"$v\"}" --out "$model" "$@" >/dev/null 2>&1
}

start=$(date +%s.%N)
for v in "${variants[@]}"; do
    pack "$v" "$out/one/$v.capz"
    "$py" -m captioning evaluate --model "$out/one/$v.capz" --prepared "$prep" --out-dir "$out/one/$v" \
        --beam-size "$beam" --latency-images 0 --spice off >/dev/null 2>&1
done
one=$(echo "$(date +%s.%N) - $start" | bc)

start=$(date +%s.%N)
for v in "${variants[@]}"; do
    pack "$v" "$out/batch/$v.capz" --caption-dir "$out/batch/$v" --beam-size "$beam"
done
"$py" -m captioning score --refs "$prep/refs_test.json" --eval-dirs "${variants[@]/#/$out/batch/}" --spice off \
    >/dev/null 2>&1
batch=$(echo "$(date +%s.%N) - $start" | bc)

"$py" - "$out" "${variants[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, variants = Path(sys.argv[1]), sys.argv[2:]
keys = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "cider_per_image")
for v in variants:
    a, b = (json.loads((out / way / v / "metrics.json").read_text()) for way in ("one", "batch"))
    assert all(a[k] == b[k] for k in keys), f"{v}: the two ways disagree"
print(f"scores equal for all {len(variants)} variants")
EOF
printf 'one variant at a time: %6.1f s\nworkflow (batched):    %6.1f s\nratio:                 %6.2fx\n' \
    "$one" "$batch" "$(echo "$one / $batch" | bc -l)"
