"""The benchmarks of trl-powerflow: scripts, run as `python benchmarks/<name>.py` (their docstrings are their --help),
that print a table and save it with plots, the command and the date under benchmarks/results/<name>/.

- elicitation.py, length_ablation.py, creativity.py, log_z_tracking.py, alpha_selection.py: LoRA runs on the embedded
  model, on the shared helpers of `common.py` (flags, the seeds x rows loop, training a row, tables, plots, results)
  and, for the capitals task, `capitals.py`.
- step_cost.py: the step cost of PowerFlowTrainer against GRPOTrainer, on the harness in `harness/`.

A package so that the tests can import them (`from benchmarks import common`); a script run puts the repository on
`sys.path` itself.
"""
