#!/usr/bin/env bash
# Time the default experiment from scratch: snakemake --cores ${CORES:-2} results/table.csv,
# in a temporary directory (so nothing cached is reused), then print the per-rule runtimes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
out=${1:-$(mktemp -d /tmp/captioning-bench.XXXX)}
mkdir -p "$out"
cp "$repo/config.yaml" "$out/config.yaml"
start=$(date +%s)
"$py" -m snakemake -s "$repo/Snakefile" -d "$out" --cores "${CORES:-2}" results/table.csv >"$out/snakemake.log" 2>&1
end=$(date +%s)
echo "default experiment: $((end - start)) s wall on ${CORES:-2} cores ($out)"
for f in "$out"/logs/benchmarks/*/*.tsv; do
    printf '%-60s %8.1f s\n' "${f#$out/logs/benchmarks/}" "$(tail -1 "$f" | cut -f1)"
done
cat "$out/results/table.md"
