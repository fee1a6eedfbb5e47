"""Training: pure step functions (step.py), state creation (state.py), device runners (runner.py), the job
(loop.py)."""
