"""triadapt's Hydra launcher for SLURM (``hydra/launcher=triadapt_slurm``, see launcher.py)."""
