"""The pipeline's steps, one module each: paths in, paths out, MLflow runs on the side. What components and
tests call, in order: `data_prep.prepare_data` / `record_data`, `teacher.train_teacher`, `prune.prune_teacher`,
`distill.distill`, `evaluate.evaluate_candidates`, `register.register`, and `finalize.finalize` (the exit
handler). `context` holds what they share: the step context, the serving wrapper, file formats and paths.
A step never reads another step's memory, only its output files, so the same function runs in a test, under
kfp.local and in a pod on a GPU node."""
