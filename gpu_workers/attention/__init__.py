"""Attention backends and the per-step forward context that lets model code reach the active backend."""
