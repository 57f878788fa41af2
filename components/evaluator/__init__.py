"""The Evaluator: TFMA metrics, then candidate and baseline compared on the same eval examples."""
