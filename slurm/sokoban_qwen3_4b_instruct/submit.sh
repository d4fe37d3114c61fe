#!/bin/bash
# Submit run 'sokoban_qwen3_4b_instruct' by hand: every stage's sbatch script in order, chained with afterok.
# Rendered by oel_hpc with launch.render_only=true; relative paths in the config are relative to the
# directory you submit from. To resume a run, prefer the python command (it submits only what is
# not done and never a task whose job is still queued).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run=/path/to/runs/sokoban_qwen3_4b_instruct
mkdir -p "$run/logs"
if [[ ! -e "$run/config.yaml" ]]; then
    cp "$here/config.yaml" "$run/config.yaml"
elif ! cmp -s "$here/config.yaml" "$run/config.yaml"; then
    echo "error: $run/config.yaml differs from $here/config.yaml (another config)" >&2; exit 1
fi
r1_extract="$(sbatch --parsable "$here/r1_extract.sbatch")"; r1_extract="${r1_extract%%;*}"
echo "r1/extract: job ${r1_extract}"
r1_gather="$(sbatch --parsable --dependency=afterok:${r1_extract} "$here/r1_gather.sbatch")"; r1_gather="${r1_gather%%;*}"
echo "r1/gather: job ${r1_gather}"
r1_deploy="$(sbatch --parsable "$here/r1_deploy.sbatch")"; r1_deploy="${r1_deploy%%;*}"
echo "r1/deploy: job ${r1_deploy}"
r1_consolidate="$(sbatch --parsable --dependency=afterok:${r1_gather}:${r1_deploy} "$here/r1_consolidate.sbatch")"; r1_consolidate="${r1_consolidate%%;*}"
echo "r1/consolidate: job ${r1_consolidate}"
r1_evaluate="$(sbatch --parsable --dependency=afterok:${r1_consolidate} "$here/r1_evaluate.sbatch")"; r1_evaluate="${r1_evaluate%%;*}"
echo "r1/evaluate: job ${r1_evaluate}"
r2_extract="$(sbatch --parsable --dependency=afterok:${r1_consolidate} "$here/r2_extract.sbatch")"; r2_extract="${r2_extract%%;*}"
echo "r2/extract: job ${r2_extract}"
r2_gather="$(sbatch --parsable --dependency=afterok:${r2_extract} "$here/r2_gather.sbatch")"; r2_gather="${r2_gather%%;*}"
echo "r2/gather: job ${r2_gather}"
r2_deploy="$(sbatch --parsable --dependency=afterok:${r1_consolidate} "$here/r2_deploy.sbatch")"; r2_deploy="${r2_deploy%%;*}"
echo "r2/deploy: job ${r2_deploy}"
r2_consolidate="$(sbatch --parsable --dependency=afterok:${r2_gather}:${r2_deploy} "$here/r2_consolidate.sbatch")"; r2_consolidate="${r2_consolidate%%;*}"
echo "r2/consolidate: job ${r2_consolidate}"
r2_evaluate="$(sbatch --parsable --dependency=afterok:${r2_consolidate} "$here/r2_evaluate.sbatch")"; r2_evaluate="${r2_evaluate%%;*}"
echo "r2/evaluate: job ${r2_evaluate}"
r3_extract="$(sbatch --parsable --dependency=afterok:${r2_consolidate} "$here/r3_extract.sbatch")"; r3_extract="${r3_extract%%;*}"
echo "r3/extract: job ${r3_extract}"
r3_gather="$(sbatch --parsable --dependency=afterok:${r3_extract} "$here/r3_gather.sbatch")"; r3_gather="${r3_gather%%;*}"
echo "r3/gather: job ${r3_gather}"
r3_deploy="$(sbatch --parsable --dependency=afterok:${r2_consolidate} "$here/r3_deploy.sbatch")"; r3_deploy="${r3_deploy%%;*}"
echo "r3/deploy: job ${r3_deploy}"
r3_consolidate="$(sbatch --parsable --dependency=afterok:${r3_gather}:${r3_deploy} "$here/r3_consolidate.sbatch")"; r3_consolidate="${r3_consolidate%%;*}"
echo "r3/consolidate: job ${r3_consolidate}"
r3_evaluate="$(sbatch --parsable --dependency=afterok:${r3_consolidate} "$here/r3_evaluate.sbatch")"; r3_evaluate="${r3_evaluate%%;*}"
echo "r3/evaluate: job ${r3_evaluate}"
echo "follow it with: python -m oel_hpc.status $run"
