"""Sweeps and searches: which runs to do, each trained through the same run line as a single run."""
