"""Shared test set-up: quiet TensorFlow, keep the AMCT log folder out of the repository."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
