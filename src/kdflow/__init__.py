"""kdflow: turn a big, accurate image classifier into a small, fast one — transfer learning, structured
pruning and knowledge distillation as a Kubeflow pipeline, tracked in MLflow."""

__version__ = "0.1.0"
