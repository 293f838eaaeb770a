"""Research tools: the experiment and its plan evaluator, reports and plots, training the demo model."""
