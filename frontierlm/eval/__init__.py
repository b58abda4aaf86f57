"""Evaluation: bits per byte, preference margins, samples and tasks defined as data (multiple
choice, exact match, pass@k); `lm_eval_adapter` plugs FrontierLM models into lm-eval."""
