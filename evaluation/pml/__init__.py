"""Adapters that make the evaluators usable from PML (AccuracyCalculator subclasses, tester hooks)."""
