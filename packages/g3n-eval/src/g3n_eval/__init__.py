"""BrainG3N evaluation: reconstruction, controllability, fidelity, memorisation, report."""
