"""The training engine: no MLflow, no files, no environment variables.

- `device`: device, seeding, autocast, memory format, per-student RNG streams;
- `ddp`: collectives and each rank's share of a batch;
- `stream`: one run's batches, shared by its students;
- `teacher_outputs`: the teacher's outputs' format, key and the one source (cached, table, live) of a run;
- `loop`: a job per student and `fit` / `fit_many`.
"""

from kdflow.engine.loop import FitResult, Student, fit, fit_many

__all__ = ["FitResult", "Student", "fit", "fit_many"]
