"""dapolicy: the Dynamics-Aligned Flow Matching Policy (DAP) for visuomotor robot learning."""

__version__ = "0.1.0"
