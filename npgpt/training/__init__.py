"""Training: the loop (loop.py), one step of it (stepper.py), the learning-rate schedule
(schedule.py) and the FLOPs count (perf.py); what a run carries across restarts is
npgpt/run_state.py, which the checkpoint code imports too. Import the module you need: this
package loads nothing on its own, so the model code can use perf.py without the loop's tqdm."""
