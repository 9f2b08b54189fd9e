"""The paper's figures and tables regenerated from tracked MLflow runs."""
