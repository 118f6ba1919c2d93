"""`make bench`: speed side by side at Phi-2 width (random weights, real architectures), in one run."""
