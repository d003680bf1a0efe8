"""One torch thread for the whole suite: on small, shared CPUs the tiny models run faster and far
steadier single-threaded than with threads fighting over the cores."""
import torch

torch.set_num_threads(1)
