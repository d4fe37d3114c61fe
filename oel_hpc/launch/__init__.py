"""Launchers execute the DAG of oel_hpc.pipeline: `local` runs every stage in this process; `slurm` renders one
sbatch script per stage (render.py) and submits them chained by dependencies (slurm.py)."""
