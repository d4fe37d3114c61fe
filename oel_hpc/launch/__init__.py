"""Launchers execute the DAG of oel_hpc.pipeline: `local` runs every stage in this process (Slurm comes later)."""
