"""mlplab's configs. Installed as the package ``mlplab.conf`` (pyproject.toml maps it to this folder), so a wheel
carries them and ``mlplab-train`` composes them from any directory."""
