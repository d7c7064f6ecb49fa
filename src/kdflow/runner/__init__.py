"""How steps are run: the entry points components call (`entrypoints`) and the local runner's warm step server
(`stepserver`). Nothing in `kdflow.steps` or `kdflow.engine` imports this package."""
