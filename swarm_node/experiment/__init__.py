"""The SAPO controlled experiment: arms and presets (presets.py), running every arm and seed as local swarms
(run.py), and its tables (results.py, stats.py) and plots (plots.py), computed only from the run logs."""
