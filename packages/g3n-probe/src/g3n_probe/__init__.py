"""BrainG3N torch-free clinical linear-probe panel."""
