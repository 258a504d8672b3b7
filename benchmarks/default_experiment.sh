#!/usr/bin/env bash
# Time the default experiment from scratch: snakemake --cores ${CORES:-2} results/table.csv,
# in a temporary directory (so nothing cached is reused), then print the CPU, the per-rule
# split of wall time into model work and overhead (benchmarks/rules.py) and the table.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
cores=${CORES:-2}
out=${1:-$(mktemp -d /tmp/captioning-bench.XXXX)}
mkdir -p "$out"
cp "$repo/config.yaml" "$out/config.yaml"
start=$(date +%s)
"$py" -m snakemake -s "$repo/Snakefile" -d "$out" --cores "$cores" results/table.csv >"$out/snakemake.log" 2>&1
end=$(date +%s)
echo "default experiment: $((end - start)) s wall on $cores cores ($out)"
# The CPU decides int8 speed: name it, and whether it has AVX2 / AVX-512 VNNI.
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
has() { grep -qw "$1" /proc/cpuinfo && echo yes || echo no; }
echo "cpu flags: avx2 $(has avx2), avx512_vnni $(has avx512_vnni)"
"$py" "$repo/benchmarks/rules.py" "$out" --wall "$((end - start))" --cores "$cores"
cat "$out/results/table.md"
