"""Entry points: the console scripts. Hydra ends here; everything below takes typed values."""
