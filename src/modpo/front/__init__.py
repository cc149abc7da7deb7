"""The Pareto front: sweep weight vectors, sample each model, score with evaluators, report."""
