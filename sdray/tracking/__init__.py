"""Experiment tracking for the training stages (MLflow, TensorBoard) that never fails a run.

config.py  TrackingConfig: the `tracking` section (light: no mlflow import)
guard.py   Guard: a failing tracking backend is a warning and a pause, never an exception
run.py     driver side: open (or reopen, on resume) the MLflow run; params, tags; model artifact; status
steps.py   rank-0 worker side: per-step metrics and validation images to MLflow and TensorBoard
"""
