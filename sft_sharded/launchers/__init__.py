"""Launchers for engines that start the processes of a run: GKE JobSet / xpk, Ray."""
