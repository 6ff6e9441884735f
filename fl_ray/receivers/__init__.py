"""Receivers: the tracking back ends (MLflow, TensorBoard, W&B) behind the Receiver contract (receivers/base.py)."""
