"""The harness behind step_cost.py, one concern a module: `cases` (models, data, trainers), `timers` (the parts of a
step), `baton` (one step at a time, round robin), `memory`, `profiling` (--profile) and `report` (the markdown).

Its modules import torch and the trainers: step_cost.py imports them only after it has set up the process."""
