"""Helpers shared by several test modules (imported as `tests.helpers.<module>`); fixtures live in conftest.py.

- `paths`: the repository root and the shared real-data folder beside it;
- `config`: the default config shrunk to seconds (`tiny_overrides`);
- `quadrants`: a tiny separable image task and the small CNNs and `fit` calls trained on it;
- `pipeline`: reading the compiled pipeline IR;
- `kfp_standin`: a Kubeflow Pipelines API stand-in on loopback;
- `servers`: real PostgreSQL, S3 (moto) and MLflow servers on loopback.
"""
