"""The kdflow pipeline definition, its compiler and its local runner (installed as `kdflow.pipelines`)."""
