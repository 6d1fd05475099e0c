"""Training: the loop, cross-entropy and SCST steps, losses, rewards."""
