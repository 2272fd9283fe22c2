"""The dualstream worker: consume jobs, micro-batch them through a dual encoder, write results.

Importing this package does not import torch; the model layer is imported where it is used.
"""
