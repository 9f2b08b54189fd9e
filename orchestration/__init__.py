"""Ray Tune / Ray Train / MLflow orchestration of modloss experiments."""
