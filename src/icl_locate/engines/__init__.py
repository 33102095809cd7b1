"""Engines: greedy generation under interventions, behind one small ``Engine`` protocol (base.py)."""
