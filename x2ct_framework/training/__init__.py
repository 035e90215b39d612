"""Training: the progressive trainer, the cascade of stages, the run folder's logbook."""
