"""The data: torchvision datasets parsed once into uint8 tensors, and the data module that serves them in batches."""
