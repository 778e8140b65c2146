"""The model: backbones (the networks, one module each) and the Lightning module that trains any of them."""
