"""Code extraction, the task that turns a dataset into token grids for the GPT (job.py; the format: data/codes.py)."""
