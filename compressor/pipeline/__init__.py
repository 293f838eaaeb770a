"""The profile → plan → compress → evaluate pipeline: profiles, sensitivity probes, the profile store, plan execution."""
