"""Training: the loop (loop.py), what a run carries across restarts (state.py), the learning-rate
schedule (schedule.py) and the FLOPs count (perf.py). Import the module you need: this package
loads nothing on its own, so the model code can use perf.py without the loop's tqdm."""
