"""BrainG3N conditional flow-matching DiT, guidance, forecasting, counterfactuals."""
