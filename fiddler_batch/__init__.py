"""fiddler-batch: offline batch inference for mixture-of-experts models on GPUs too small for them."""

__version__ = "0.2.0"
