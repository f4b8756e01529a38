"""Test set-up: Keras runs on the JAX backend; TensorFlow is never needed."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
